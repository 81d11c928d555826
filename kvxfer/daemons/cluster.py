"""A disaggregated deployment on one machine: prefill and decode services and the proxy as
separate processes on loopback. Used by `kvxfer demo`, the end-to-end tests and the soak.

A service (or the proxy) given a `Host` (kvxfer.hosts: a network namespace with its own address)
runs inside it as the Kubernetes manifests start a pod: HTTP on every address, the side channel
bound to the host's address and advertised with it, the manifests' ports, and the host's
environment (UCX over TCP). Probes and scrapes of such a service are made from inside its host
(`reach`), as a kubelet probes from the pod's node.

Each service runs `kvxfer serve` in its own process group, so stopping it (or killing it, for
fault tests) takes its rank processes with it. CURVE keys are generated into the work directory
unless `insecure` is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from kvxfer.agents.keys import generate_keypair, write_keypair
from kvxfer.agents.messages import Role
from kvxfer.daemons.settings import PROXY_PORT, ROLE_DEFAULTS
from kvxfer.errors import ConfigError
from kvxfer.ports import free_ports

if TYPE_CHECKING:
    from kvxfer.hosts.topology import Host

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceSpec:
    role: str  # "prefill" or "decode"
    tp: int = 1
    layout: str = "flashinfer-hnd"
    block_size: int = 16
    num_blocks: int = 256
    extra: tuple[str, ...] = ()  # more `kvxfer serve` flags (mode, deadlines, lease...)
    host: Host | None = None  # None: loopback of this machine
    meet_producers: bool = False  # decode: `--producers` naming every prefill service of the cluster


@dataclass
class Running:
    spec: ServiceSpec
    name: str
    http_port: int
    side_port: int
    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    host: Host | None = None

    @property
    def address(self) -> str:
        return self.host.address if self.host is not None else "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.http_port}"


@dataclass
class LocalCluster:
    workdir: Path
    prefill: list[ServiceSpec]
    decode: list[ServiceSpec]
    preset: str = "tiny-demo"
    model_dir: Path | None = None
    seed: int = 0
    decode_seed: int | None = None  # a different seed on decode: negative controls only
    device: str = "cpu"
    mode: str = "read"
    insecure: bool = False
    log_level: str = "INFO"
    proxy_args: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # `kvxfer serve` flags for every service (e.g. --dtype)
    proxy_host: Host | None = None  # None: loopback of this machine
    services: list[Running] = field(default_factory=list)
    proxy: Running | None = None
    _ports: set[int] = field(default_factory=set)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, *, timeout_s: float = 180.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        keys = None if self.insecure else self._keys()
        for i, spec in enumerate(self.prefill):
            self.services.append(self._service(spec, f"prefill{i}", keys))
        for i, spec in enumerate(self.decode):
            self.services.append(self._service(spec, f"decode{i}", keys))
        self._check_placement()
        for svc in self.services:
            self._launch(svc)
        self.proxy = self._proxy()
        self._launch(self.proxy)
        self.wait_ready(timeout_s=timeout_s)

    def wait_ready(self, *, timeout_s: float, services: list[Running] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        for svc in services or [*self.services, self.proxy]:
            while True:
                if svc.proc is not None and svc.proc.poll() is not None:
                    raise ConfigError(f"{svc.name} exited with {svc.proc.returncode}:\n{self.tail(svc)}")
                try:
                    if self.get(svc, "/ready", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ConfigError(f"{svc.name} not ready after {timeout_s:.0f} s:\n{self.tail(svc)}")
                time.sleep(0.2)

    def stop(self) -> None:
        for svc in [self.proxy, *self.services]:
            if svc is not None:
                self._terminate(svc)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self.proxy is None:
            raise ConfigError("cluster not started")
        return self.proxy.url

    def reach(self, svc: Running) -> contextlib.AbstractContextManager[None]:
        """Where to stand to reach `svc`: inside its host, or here for loopback services."""
        return svc.host.entered() if svc.host is not None else contextlib.nullcontext()

    def get(self, svc: Running, path: str, *, timeout: float) -> httpx.Response:
        """GET one of the service's endpoints (/ready, /health, /metrics) from its own host."""
        with self.reach(svc):
            return httpx.get(f"{svc.url}{path}", timeout=timeout)

    def by_name(self, name: str) -> Running:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise ConfigError(f"no service {name!r} in {[s.name for s in self.services]}")

    # ---- faults -------------------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a whole service (rank 0 and its rank processes)."""
        svc = self.by_name(name)
        if svc.proc is not None and svc.proc.poll() is None:
            os.killpg(svc.proc.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                svc.proc.wait(30)

    def restart(self, name: str, *, timeout_s: float = 120.0) -> None:
        self.relaunch(name)
        self.wait_ready(timeout_s=timeout_s, services=[self.by_name(name)])

    def relaunch(self, name: str) -> None:
        """Stop a service (and any rank left of it) and start it again; does not wait for /ready
        (a supervisor's restart: the soak's, Kubernetes' in production)."""
        svc = self.by_name(name)
        self._terminate(svc)
        self._launch(svc)

    def exit_code(self, name: str) -> int | None:
        """The service's exit status, or None while its rank-0 process runs."""
        proc = self.by_name(name).proc
        return None if proc is None else proc.poll()

    def tail(self, svc: Running, lines: int = 30) -> str:
        try:
            return "\n".join(svc.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ---- internals ----------------------------------------------------------------------------

    def _keys(self) -> Path:
        """One key pair per pool (`kvxfer keys generate` does the same); each pool's allow-list
        (`allowed-by-<pool>/`) holds the other pool's public key."""
        keydir = self.workdir / "keys"
        for pool in ("prefill", "decode"):
            if not (keydir / f"{pool}.key_secret").exists():
                write_keypair(generate_keypair(), keydir, pool)
        for pool, other in (("prefill", "decode"), ("decode", "prefill")):
            allowed = keydir / f"allowed-by-{pool}"
            allowed.mkdir(exist_ok=True)
            (allowed / f"{other}.key").write_bytes((keydir / f"{other}.key").read_bytes())
        return keydir

    def _proxy(self) -> Running:
        host = self.proxy_host
        port = PROXY_PORT if host is not None else free_ports(1, self._ports)
        args = ["proxy", "--port", str(port), "--prefill", *[s.url for s in self.services if s.spec.role == "prefill"],
                "--decode", *[s.url for s in self.services if s.spec.role == "decode"], *self.proxy_args]
        if host is not None:
            args += ["--host", "0.0.0.0"]
        return Running(ServiceSpec("proxy"), "proxy", port, 0, args, self.workdir / "proxy.log", host=host)

    def _check_placement(self) -> None:
        """A host runs at most one service per pool: they take the manifests' fixed ports."""
        placed = [(s.host.netns, s.spec.role) for s in self.services if s.host is not None]
        if len(placed) != len(set(placed)):
            raise ConfigError(f"two services of one pool on one host (they would share ports): {placed}")

    def _ports_of(self, spec: ServiceSpec) -> tuple[int, int]:
        """The manifests' ports inside a host of its own (its namespace has nothing else), free
        ports of this machine on loopback."""
        if spec.host is not None:
            defaults = ROLE_DEFAULTS[Role(spec.role)]
            return defaults.port, defaults.side_channel_port
        return free_ports(1, self._ports), free_ports(spec.tp, self._ports)

    def _service(self, spec: ServiceSpec, name: str, keys: Path | None) -> Running:
        http_port, side_port = self._ports_of(spec)
        seed = self.decode_seed if spec.role == "decode" and self.decode_seed is not None else self.seed
        model = ["--model", str(self.model_dir)] if self.model_dir else ["--preset", self.preset, "--seed", str(seed)]
        args = ["serve", spec.role, *model, "--tp", str(spec.tp), "--layout", spec.layout,
                "--block-size", str(spec.block_size), "--num-blocks", str(spec.num_blocks),
                "--device", self.device, "--port", str(http_port), "--side-channel-port", str(side_port),
                "--mode", self.mode, "--engine-id", name, *self.extra, *spec.extra]
        if spec.host is not None:  # as deploy/k8s/base: HTTP on every address, side channel on the pod IP
            args += ["--host", "0.0.0.0", "--side-channel-host", spec.host.address,
                     "--advertise-host", spec.host.address]
        if spec.meet_producers:  # the prefill services come first in `services`
            args += ["--producers", *[f"tcp://{s.address}:{s.side_port}" for s in self.services if s.spec.role == "prefill"]]
        if keys is None:
            args.append("--insecure-plaintext")
        else:
            other = "decode" if spec.role == "prefill" else "prefill"
            args += ["--curve-secret-key-file", str(keys / f"{spec.role}.key_secret"),
                     "--curve-allowed-keys-dir", str(keys / f"allowed-by-{spec.role}"),
                     "--curve-server-key-file", str(keys / f"{other}.key")]
        return Running(spec, name, http_port, side_port, args, self.workdir / f"{name}.log", host=spec.host)

    def _launch(self, svc: Running) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(svc.host.env if svc.host else ())}
        argv = [sys.executable, "-m", "kvxfer.cli", "--log-level", self.log_level, *svc.args]
        with open(svc.log_path, "ab") as out:
            svc.proc = subprocess.Popen(
                svc.host.command(argv) if svc.host is not None else argv,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)

    def _terminate(self, svc: Running) -> None:
        proc = svc.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass
        # rank processes left behind by a rank 0 that died first
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
