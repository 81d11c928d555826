"""What `kvxfer bench` runs (BenchConfig) and what it reports (BenchResult). Both are msgspec
Structs: the config travels to each rank process as bytes, the result prints as JSON."""

from __future__ import annotations

from enum import Enum

import msgspec

from kvxfer.errors import ConfigError
from kvxfer.planning import map_tp


class Strategy(Enum):
    """Who initiates: decode pulls (READ), prefill pushes (WRITE), or both at once on halves of
    the request (SPLIT: decode reads the first blocks while prefill writes the rest, so the two
    processes' cores copy in parallel)."""

    READ = "read"
    WRITE = "write"
    SPLIT = "split"


class StrategyChoice(Enum):
    """`--mode`: a `Strategy`, or AUTO."""

    READ = "read"
    WRITE = "write"
    SPLIT = "split"
    AUTO = "auto"  # measure every strategy at setup, keep the fastest

    def fixed(self) -> Strategy | None:
        """The strategy this choice fixes; None for AUTO (measured at setup)."""
        return {StrategyChoice.READ: Strategy.READ, StrategyChoice.WRITE: Strategy.WRITE,
                StrategyChoice.SPLIT: Strategy.SPLIT}.get(self)


class PlanKind(Enum):
    PREPPED = "prepped"  # descriptor tables prepared once per peer, int32 indices per request
    SPANS = "spans"  # coalesced explicit spans per request (initialize_xfer)
    PER_BLOCK = "per-block"  # naive: one descriptor per block unit, no coalescing (initialize_xfer)
    STAGED = "staged"  # gather into a registered staging buffer, one WRITE per peer, scatter
    AUTO = "auto"  # calibrate the cost model on this fabric, then prepped or staged as it says


class BenchConfig(msgspec.Struct, frozen=True, kw_only=True):
    prefill_layout: str = "flashinfer-hnd"
    decode_layout: str = "flashinfer-hnd"
    prefill_tp: int = 1
    decode_tp: int = 1
    kv_heads: int = 8
    head_dim: int = 128
    layers: int = 32
    prefill_block_size: int = 16
    decode_block_size: int = 16
    tokens: int = 8192
    dtype: str = "bfloat16"
    mode: StrategyChoice = StrategyChoice.READ
    plan: PlanKind = PlanKind.PREPPED
    fallback: str = "none"
    device: str = "cpu"
    random_blocks: bool = True
    spare_blocks: float = 0.25  # pool = request blocks * (1 + spare)
    seed: int = 0
    iters: int = 5
    verify: bool = False
    dump: str | None = None
    threading: str = "app-poll"
    error_handling: str = "none"
    num_workers: int = 1
    num_threads: int = 0
    deadline_slack_s: float = 10.0
    expected_gbps: float = 0.2
    memcpy: bool = True
    # --plan staged: 0 or 1, kept for the flag; the daemons' staged path (what the bench runs)
    # moves each part as one WRITE, without a layer-group pipeline
    staged_groups: int = 0
    huge_pages: bool = True  # host caches (and the memcpy baseline) on transparent huge pages

    def check(self) -> None:
        for name in ("prefill_tp", "decode_tp", "kv_heads", "head_dim", "layers", "tokens",
                     "prefill_block_size", "decode_block_size", "iters", "num_workers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"bench: {name}={getattr(self, name)} must be positive")
        if self.staged_groups not in (0, 1):
            raise ConfigError(f"bench: staged_groups={self.staged_groups} must be 0 or 1: the daemons' staged "
                              "path, which the bench runs, moves each part as one WRITE (no layer groups)")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"bench: device={self.device!r} is not 'cpu' or 'cuda'")
        if self.spare_blocks < 0:
            raise ConfigError(f"bench: spare_blocks={self.spare_blocks} must not be negative")
        map_tp(self.kv_heads, self.prefill_tp, self.decode_tp)  # PlanError before any spawn


class OpFigures(msgspec.Struct, kw_only=True):
    """One strategy's measured figures (medians over the timed runs)."""

    transfer_ms: float
    gbps: float
    transfer_ms_all: list[float]
    memcpy_gbps: float = 0.0  # copy baseline right after each run, median
    ratio: float = 0.0  # median of per-run gbps / copy gbps
    ratio_all: list[float] = []
    phases_ms: dict[str, float] = {}  # staged: when each step ended, ms from start, median


class BenchResult(msgspec.Struct, kw_only=True):
    mode: str  # the op actually measured (read or write)
    plan: str
    prefill_tp: int
    decode_tp: int
    device: str
    threading: str
    error_handling: str
    huge_pages: bool
    num_workers: int
    num_threads: int
    bytes: int  # moved to all decode ranks per request
    descriptors: int  # posted by all initiators per request
    nixl_descriptors: int  # after NIXL merged adjacent descriptors (telemetry)
    num_transfers: int  # one per (initiator, peer)
    plan_us: float  # per-request planning (indices or spans), slowest initiator, median
    post_us: float  # NIXL telemetry: slowest post, median
    transfer_ms: float  # first post to last completion, median over iterations
    gbps: float
    memcpy_gbps: float  # single-thread copy of the same bytes right after each run, median
    ratio: float  # median over runs of (gbps / memcpy_gbps) of that run
    verified: bool | None  # None when --verify was not given
    notif_rtt_us: float  # NIXL notification round trip decode0 <-> prefill0, median
    iters: int
    transfer_ms_all: list[float]
    ratio_all: list[float]
    auto: dict[str, float] | None = None  # gbps per op measured by --mode auto
    cost_model: dict | None = None  # --plan auto: calibrated costs, estimates, choice, both measured
    phases_ms: dict[str, float] = {}  # staged: when each step ended, ms from start (staged.PHASES)
    gpu_sharing: str = ""  # cuda: "mps" or "time-sliced" (how processes on one GPU share it)
