"""Free TCP ports on loopback for local launches and tests.

A port the kernel hands out for `bind(0)` lies in the ephemeral range, which it also uses for
the local end of every outgoing connection (UCX, ZeroMQ, HTTP clients of any process on the
machine). Between picking such a port and a service listening on it, a connection can take it
("address already in use"). So ports are picked below that range, where the kernel never
assigns one by itself, and checked free at the time of picking.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from kvxfer.errors import ConfigError

_LOWEST = 20000  # above the registered services most machines run
_ATTEMPTS = 500


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int, taken: set[int] | None = None) -> int:
    """A base port with `count` consecutive free ports on loopback (side channels: base + rank),
    below the ephemeral range where the host leaves room for them, and none of them in `taken`
    (which gets them: ports handed out but not yet listened on)."""
    taken = set() if taken is None else taken
    top = ephemeral_start() - count
    for _ in range(_ATTEMPTS):
        # A host whose ephemeral range starts low leaves no room below it: pick as bind(0) does.
        base = random.randrange(_LOWEST, top) if top > _LOWEST + _ATTEMPTS else _kernel_pick()
        ports = set(range(base, base + count))
        if base + count <= 65536 and not ports & taken and all(_port_free(p) for p in ports):
            taken.update(ports)
            return base
    raise ConfigError(f"no {count} consecutive free ports on 127.0.0.1 after {_ATTEMPTS} tries")


def _kernel_pick() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port() -> int:
    """One free port on loopback, below the ephemeral range."""
    return free_ports(1)


def ephemeral_port() -> int:
    """A free port the kernel picks, for a listener this process starts at once (a TP group's
    rendezvous). Below the ephemeral range it could be a port a launcher handed to another
    service that has not listened on it yet (seen: a prefill service's HTTP port taken by
    another's rendezvous while both started); here only an outgoing connection can take it,
    in the moment before the listener binds."""
    return _kernel_pick()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
