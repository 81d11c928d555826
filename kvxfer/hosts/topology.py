"""Hosts on one machine: network namespaces cabled to one switch, each with its own address, as
nodes of a cluster are. The switch is a bridge in a namespace of its own; a host's cable is a
veth pair (`eth0` in the host, `to-<host>` on the switch).

Taking a host's switch port down is the partition: the host keeps its address and route, its
`eth0` loses carrier, and packets either way are dropped without a word, as when a cable or a
switch port fails (a TCP peer sees a stall, not a reset). Loopback inside each host stays up.

Each host has a name (its role) that its own /etc/hosts resolves to its address, as a Kubernetes
pod's does; `Host.pod_command` also gives the process that hostname (a UTS namespace of its own),
so a program that binds `gethostbyname(gethostname())` binds the host's address, as in a pod.

Addresses come from 198.18.0.0/24 (RFC 2544's benchmarking range) and exist only inside these
namespaces; no host has a default route, so nothing can leave the topology.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

from kvxfer.hosts import netns

log = logging.getLogger(__name__)
SUBNET_PREFIX = "198.18.0."
PREFIX_LEN = 24
INTERFACE = "eth0"
_seq = itertools.count()


@dataclass(frozen=True)
class Host:
    """One host: its namespace, its address on the switch, and the environment its processes get."""

    role: str  # "prefill", "decode", ...
    netns: str
    address: str
    interface: str = INTERFACE
    env: tuple[tuple[str, str], ...] = ()  # extra environment for every process started here

    @property
    def port(self) -> str:
        """This host's port on the switch."""
        return f"to-{self.role}"[:15]

    @property
    def hostname(self) -> str:
        return self.role

    def command(self, argv: list[str]) -> list[str]:
        return [*netns.exec_prefix(self.netns), *argv]

    def pod_command(self, argv: list[str]) -> list[str]:
        """`command`, plus a UTS namespace whose hostname is this host's name: the process sees
        the name and /etc/hosts a pod sees (each step execs in place: the pid stays argv's)."""
        unshare, hostname = shutil.which("unshare"), shutil.which("hostname")
        if unshare is None or hostname is None:
            raise netns.NetnsError(f"a pod's own hostname needs `unshare` and `hostname` on PATH "
                                   f"(found unshare={unshare}, hostname={hostname})")
        return self.command([unshare, "--uts", "sh", "-c", f'{hostname} "$0" && exec "$@"', self.hostname, *argv])

    def entered(self) -> contextlib.AbstractContextManager[None]:
        return netns.entered(self.netns)

    def counters(self) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of this host's interface, read from inside the host."""
        with self.entered(), open("/proc/thread-self/net/dev") as dev:
            for line in dev:
                name, _, rest = line.partition(":")
                if name.strip() == self.interface:
                    fields = rest.split()
                    return int(fields[0]), int(fields[8])
        raise netns.NetnsError(f"no interface {self.interface} in {self.netns}")


def _hosts_file(host: Host) -> str:
    """The host's name first, then this machine's /etc/hosts: processes not started as pods still
    resolve this machine's name as before (gloo, for one, resolves it to pick an address)."""
    with open("/etc/hosts") as machine:
        return f"{host.address} {host.hostname}\n{machine.read()}"


# UCX between hosts as between nodes without RDMA: TCP only, over the host's own interface. The
# other transports UCX would pick on one machine (cma = process_vm_readv, shared memory) cross
# namespaces, so a partition would not cut them.
UCX_TCP_ENV = (("UCX_TLS", "tcp"), ("UCX_NET_DEVICES", INTERFACE))


@dataclass
class Topology:
    """`roles` hosts on one switch. A context manager: built on enter, torn down on exit (also
    when the body raised); `build` first sweeps namespaces left by crashed runs."""

    roles: tuple[str, ...] = ("prefill", "decode")
    env: tuple[tuple[str, str], ...] = UCX_TCP_ENV
    hosts: dict[str, Host] = field(default_factory=dict)
    switch: str = ""
    _cut: set[str] = field(default_factory=set)

    def __enter__(self) -> Topology:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def build(self) -> None:
        netns.sweep_stale()
        run = next(_seq)
        self.switch = netns.owned_name(f"{run}-switch")
        try:
            netns.create(self.switch)
            netns.ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            netns.ip("-n", self.switch, "link", "set", "br0", "up")
            for i, role in enumerate(self.roles):
                self.hosts[role] = self._cable(Host(role, netns.owned_name(f"{run}-{role}"),
                                                    f"{SUBNET_PREFIX}{i + 1}", env=self.env))
        except BaseException:
            self.teardown()
            raise
        log.info("topology up: %s on switch %s",
                 ", ".join(f"{h.role} {h.address} ({h.netns})" for h in self.hosts.values()), self.switch)

    def _cable(self, host: Host) -> Host:
        netns.create(host.netns)
        netns.ip("link", "add", host.interface, "netns", host.netns, "type", "veth",
                 "peer", "name", host.port, "netns", self.switch)
        netns.ip("-n", self.switch, "link", "set", host.port, "master", "br0")
        netns.ip("-n", self.switch, "link", "set", host.port, "up")
        netns.ip("-n", host.netns, "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", host.interface)
        netns.ip("-n", host.netns, "link", "set", host.interface, "up")
        netns.write_etc(host.netns, "hosts", _hosts_file(host))
        return host

    def teardown(self) -> None:
        """Delete every namespace of this topology (and kill what still runs in them)."""
        errors = []
        for name in [h.netns for h in self.hosts.values()] + ([self.switch] if self.switch else []):
            try:
                netns.delete(name)
            except netns.NetnsError as err:  # keep deleting the others; report at the end
                errors.append(str(err))
        self.hosts.clear()
        self._cut.clear()
        if errors:
            raise netns.NetnsError("; ".join(errors))

    def host(self, role: str) -> Host:
        try:
            return self.hosts[role]
        except KeyError:
            raise netns.NetnsError(f"no host {role!r} in this topology ({sorted(self.hosts)})") from None

    # ---- partitions -------------------------------------------------------------------------

    def cut(self, role: str) -> None:
        """Take the host's switch port down: nothing reaches it or leaves it but loopback."""
        netns.ip("-n", self.switch, "link", "set", self.host(role).port, "down")
        self._cut.add(role)
        log.warning("link of %s down", role)

    def restore(self, role: str) -> None:
        netns.ip("-n", self.switch, "link", "set", self.host(role).port, "up")
        self._cut.discard(role)
        log.warning("link of %s up", role)

    def is_cut(self, role: str) -> bool:
        return role in self._cut

    @contextlib.contextmanager
    def partitioned(self, role: str) -> Iterator[None]:
        """The host cut off for the body, restored after it (also when the body raised)."""
        self.cut(role)
        try:
            yield
        finally:
            self.restore(role)

    def reset_connections(self, role: str, *, ports: range) -> int:
        """RST every established TCP connection to the host's `ports` (from inside the host,
        `ss -K`), as a conntrack flush would; returns how many there were."""
        filt = f"( sport >= :{ports.start} and sport < :{ports.stop} )"
        listed = netns.run_in(self.host(role).netns, ["ss", "-Htn", "state", "established", filt])
        netns.run_in(self.host(role).netns, ["ss", "-K", "state", "established", filt])
        return len([line for line in listed.splitlines() if line.strip()])
