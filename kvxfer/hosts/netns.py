"""Linux network namespaces: create, enter, run commands in, delete, and sweep the ones a crashed
run left behind. Thin over `ip netns` (iproute2) plus one `setns(2)` for entering from a thread.

Every namespace this module makes is named `kvxfer-<pid>-...`, `<pid>` being the process that
made it, so a later run can tell a stale namespace (its maker is gone) from one another run on
this machine still uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator

from kvxfer.errors import ConfigError

log = logging.getLogger(__name__)
PREFIX = "kvxfer-"
NETNS_DIR = "/run/netns"  # where `ip netns add` mounts a namespace
ETC_DIR = "/etc/netns"  # `ip netns exec NAME` bind-mounts each file of ETC_DIR/NAME/ over /etc/
_CLONE_NEWNET = 0x40000000
_OWNER = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(ConfigError):
    """A namespace, link or address could not be made or changed (not root, no iproute2...)."""


def ip_binary() -> str:
    path = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
    if path is None:
        raise NetnsError("network namespaces need iproute2's `ip`, which is not on PATH")
    return path


def ip(*args: str) -> str:
    """Run `ip ARGS`; its stdout, or NetnsError naming the command and what it said."""
    done = subprocess.run([ip_binary(), *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def owned_name(tag: str) -> str:
    """A namespace name that records this process as its maker."""
    return f"{PREFIX}{os.getpid()}-{tag}"


def create(name: str) -> None:
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")  # the ranks of a service talk over loopback


def delete(name: str) -> None:
    """SIGKILL what still runs in the namespace (processes this suite started there), then delete
    it, and its files under ETC_DIR. Missing namespaces are fine: deletion must work on a
    half-built topology."""
    shutil.rmtree(f"{ETC_DIR}/{name}", ignore_errors=True)
    if not os.path.exists(f"{NETNS_DIR}/{name}"):
        return
    for pid in pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    ip("netns", "delete", name)


def pids(name: str) -> list[int]:
    done = subprocess.run([ip_binary(), "netns", "pids", name], capture_output=True, text=True, timeout=30)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def listed() -> list[str]:
    """Namespaces, and names that still have files under ETC_DIR (a run killed mid-teardown)."""
    names: set[str] = set()
    for directory in (NETNS_DIR, ETC_DIR):
        with contextlib.suppress(FileNotFoundError):
            names.update(os.listdir(directory))
    return sorted(names)


def write_etc(name: str, filename: str, text: str) -> None:
    """A file that processes started with `exec_prefix(name)` see as /etc/<filename>."""
    directory = f"{ETC_DIR}/{name}"
    os.makedirs(directory, exist_ok=True)
    with open(f"{directory}/{filename}", "w") as out:
        out.write(text)


def sweep_stale() -> list[str]:
    """Delete every kvxfer namespace whose maker process is gone (a run that crashed or was
    killed before its teardown); returns their names. Namespaces of live runs are left alone."""
    stale = [n for n in listed() if (m := _OWNER.match(n)) and not pid_alive(int(m.group(1)))]
    for name in stale:
        log.warning("deleting stale network namespace %s (its maker is gone)", name)
        delete(name)
    return stale


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exec_prefix(name: str) -> list[str]:
    """argv prefix that runs a command inside the namespace (`ip netns exec` execs it in place,
    so the pid Popen returns is the command's own)."""
    return [ip_binary(), "netns", "exec", name]


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread (only it) into the namespace, and back on exit. Sockets made inside
    stay in it: an HTTP probe made here is a probe from that host, as a kubelet's is from its node."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(f"{NETNS_DIR}/{name}")
        try:
            yield
        finally:
            if _libc.setns(home, _CLONE_NEWNET) != 0:  # cannot happen for a root-made namespace
                raise NetnsError(f"could not return from network namespace {name}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(home)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            raise NetnsError(f"setns({path}): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def why_unavailable() -> str | None:
    """None if this process can make, enter and delete a network namespace; else the reason."""
    name = owned_name("probe")
    try:
        create(name)
        with entered(name):
            pass
    except (NetnsError, OSError) as err:
        return f"network namespaces cannot be created here ({err}); they need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2"
    finally:
        with contextlib.suppress(NetnsError, OSError):
            delete(name)
    return None


def run_in(name: str, argv: list[str]) -> str:
    """Run a short command inside the namespace; its stdout, or NetnsError."""
    done = subprocess.run([*exec_prefix(name), *argv], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` in {name} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout
