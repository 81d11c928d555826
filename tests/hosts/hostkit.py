"""What the two-host tests share: the deployment on the topology, the two legs of a request as
the proxy makes them (so a test can cut the link between them), and waits on events (bytes on a
host's interface, blocks released) instead of sleeps. Everything goes through HTTP and /metrics,
so these tests do not depend on how the services move KV inside."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from kvxfer.daemons.cluster import LocalCluster, Running, ServiceSpec
from kvxfer.hosts import Topology, why_unavailable
from kvxfer.soak.run import scrape

HELD = ("kvxfer_blocks_in_use", "kvxfer_blocks_held")
PREFILL_TIMEOUT_S = 600.0  # a 2,000-token small-gpu prefill took over 120 s on the shared 2 cores
POLL_S = 0.0005  # counters are read from /proc, ~50 us: poll fine enough to land inside a transfer
READY_TIMEOUT_S = 420.0  # a first start on a shared 2-core machine (kernel warmup included)
_reason: list[str | None] = []


def namespaces_or_skip() -> None:
    """Skip (with the reason) where network namespaces cannot be made: not root, no iproute2."""
    if not _reason:
        _reason.append(why_unavailable())
    if _reason[0] is not None:
        pytest.skip(_reason[0])


def reference(prompt: list[int], max_tokens: int, *, preset: str) -> list[int]:
    """The same model in one process (TP 1): what every two-host answer must equal."""
    from kvxfer.engine import CacheConfig, Engine, EngineConfig
    from kvxfer.engine import preset as model_preset

    engine = Engine(EngineConfig(model=model_preset(preset), device="cpu", seed=0,
                                 cache=CacheConfig(num_blocks=len(prompt) // 16 + 4)))
    return list(engine.generate(prompt, max_tokens).tokens)


@dataclass(frozen=True)
class Setup:
    """One deployment to put on the two hosts."""

    name: str
    mode: str = "read"
    transfer_path: str = "auto"
    staging_mib: int = 0
    prefill_tp: int = 1
    decode_tp: int = 1
    preset: str = "tiny-demo"
    num_blocks: int = 320
    lease_s: float = 6.0
    deadline_s: float = 2.0
    expected_gbps: float = 0.5  # the cpu-demo overlay's KVXFER_EXPECTED_GBPS
    proxy_timeout_s: float = 60.0

    def flags(self, role: str) -> tuple[str, ...]:
        out = ("--lease-s", str(self.lease_s), "--transfer-deadline-s", str(self.deadline_s),
               "--expected-gbps", str(self.expected_gbps))
        if self.staging_mib:
            out += ("--staging-mib", str(self.staging_mib))
        return out + (("--transfer-path", self.transfer_path) if role == "decode" else ())


@dataclass
class Deployment:
    """Prefill on its host; decode and the proxy (a sidecar of decode) on the other."""

    topology: Topology
    setup: Setup
    workdir: Path
    cluster: LocalCluster = field(init=False)

    def __enter__(self) -> Deployment:
        try:
            self.cluster.start(timeout_s=READY_TIMEOUT_S)
        except BaseException:
            self.cluster.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.stop()

    def __post_init__(self) -> None:
        s, hosts = self.setup, self.topology.hosts
        self.cluster = LocalCluster(
            workdir=self.workdir, preset=s.preset, mode=s.mode, proxy_host=hosts["decode"],
            prefill=[ServiceSpec("prefill", s.prefill_tp, num_blocks=s.num_blocks, extra=s.flags("prefill"),
                                 host=hosts["prefill"])],
            decode=[ServiceSpec("decode", s.decode_tp, num_blocks=s.num_blocks, extra=s.flags("decode"),
                                host=hosts["decode"])],
            proxy_args=("--request-timeout-s", str(s.proxy_timeout_s)))

    @property
    def prefill(self) -> Running:
        return self.cluster.by_name("prefill0")

    @property
    def decode(self) -> Running:
        return self.cluster.by_name("decode0")

    def post(self, svc: Running, path: str, body: dict, *, timeout: float = 120.0) -> httpx.Response:
        """POST from decode's host (where the proxy and its clients are)."""
        with self.topology.host("decode").entered():
            return httpx.post(f"{svc.url}{path}", json=body, timeout=timeout)

    def complete(self, prompt: list[int], max_tokens: int) -> httpx.Response:
        return self.post(self.cluster.proxy, "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens})

    def prefill_leg(self, prompt: list[int], max_tokens: int) -> dict:
        """What the proxy does first: decode's identity, then prefill with decode bound as the
        consumer. Returns the decode leg's body (the request plus kv_transfer_params); from here
        on prefill holds the request's blocks under a lease."""
        info = self.cluster.get(self.decode, "/v1/kvxfer/identity", timeout=10.0).json()
        body = {"prompt": prompt, "max_tokens": max_tokens}
        reply = self.post(self.prefill, "/v1/completions", {**body, "kvxfer_consumer": {"consumer_key": info["public_key"]}},
                          timeout=PREFILL_TIMEOUT_S)
        assert reply.status_code == 200, reply.text
        return {**body, "kv_transfer_params": reply.json()["kv_transfer_params"]}

    def held(self) -> dict[str, float]:
        """Blocks in use or held on each service, and staging slots reserved on decode."""
        out = {}
        for svc in (self.prefill, self.decode):
            values = scrape(self.cluster, svc, *HELD, "kvxfer_staging_slots_free")
            out |= {f"{svc.name} {k}": v for k, v in values.items() if k in HELD}
            if self.setup.staging_mib and svc is self.decode:
                out["decode0 staging slots reserved"] = 2 - values.get("kvxfer_staging_slots_free", -1)
        return out

    def wait_released(self) -> dict[str, float]:
        """Poll until nothing is held (leases expire after lease_s); returns the last reading."""
        deadline = time.monotonic() + self.setup.lease_s + 20.0
        while any((held := self.held()).values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return held


class Leg(threading.Thread):
    """The decode leg in a thread, timed, so the test can cut the link while it runs."""

    def __init__(self, deployment: Deployment, body: dict) -> None:
        super().__init__(daemon=True)
        self.deployment, self.body = deployment, body
        self.reply: httpx.Response | None = None
        self.error: Exception | None = None
        self.seconds = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.reply = self.deployment.post(self.deployment.decode, "/v1/completions", self.body)
        except Exception as err:  # reported by the test, which asserts there is none
            self.error = err
        self.seconds = time.monotonic() - started


def cut_when_bytes_flow(topology: Topology, *, role: str, threshold: int, leg: Leg, timeout_s: float = 60.0) -> int:
    """Cut `role`'s link as soon as `threshold` more bytes left its interface than when this was
    called (a handshake or a transfer under way); returns the bytes sent by then, or -1 if the leg
    ended first (the fault missed its moment)."""
    host = topology.host(role)
    start = host.counters()[1]
    deadline = time.monotonic() + timeout_s
    leg.start()
    while leg.is_alive() and time.monotonic() < deadline:
        sent = host.counters()[1] - start
        if sent >= threshold:
            topology.cut(role)
            return sent
        time.sleep(POLL_S)
    return -1


def kv_bytes(preset: str, num_tokens: int, *, block_size: int = 16, dtype_bytes: int = 4) -> int:
    """Bytes of a request's KV (whole blocks, every layer, K and V; float32 on cpu)."""
    from kvxfer.engine import preset as model_preset

    m = model_preset(preset)
    num_blocks = -(-num_tokens // block_size)
    return num_blocks * block_size * m.num_layers * m.num_kv_heads * m.head_dim * 2 * dtype_bytes


def typed_error(reply: httpx.Response) -> str:
    """The error body's type, or '' when the reply is not a typed error."""
    try:
        return str(reply.json()["error"]["type"])
    except (ValueError, KeyError, TypeError):
        return ""
