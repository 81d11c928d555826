"""Coordinator <-> rank messages of `kvxfer bench`: one tagged union, sent as msgspec bytes over
multiprocessing pipes (local only; the authenticated side channel is for real deployments)."""

from __future__ import annotations

import msgspec

from kvxfer.agents.nixl_agent import Op
from kvxfer.bench.config import PlanKind, Strategy
from kvxfer.layouts import CacheDesc


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    pass


class Hello(_Msg):
    """A rank's agent and cache, sent once after it registered its memory."""

    role: str  # "prefill" or "decode"
    rank: int
    agent: str
    metadata: bytes
    desc: CacheDesc
    layer_addrs: list[int]
    device_id: int
    mem: str  # "DRAM" or "VRAM"
    block_ids: list[int]  # flattened; [2, n] for separate K/V pages
    staging_addr: int = 0  # registered staging buffer (PlanKind.STAGED), 0 when none


class Peers(_Msg):
    hellos: list[Hello]


class Prepare(_Msg):
    """Build plans and descriptor lists for every op this rank may initiate."""

    ops: list[Op]
    plan: PlanKind


class Scramble(_Msg):
    """Overwrite the decode cache (so a verified run proves this run wrote it); snapshot it for
    --dump when `snapshot`."""

    snapshot: bool


class Run(_Msg):
    strategy: Strategy
    plan: PlanKind


class Deliver(_Msg):
    """Decode ranks wait for the producers' notifications of the last WRITE (or SPLIT)."""

    strategy: Strategy


class PingPong(_Msg):
    """decode0 sends `count` notifications to prefill0, each echoed back before the next."""

    count: int


class Latency(_Msg):
    rtt_us: list[float]


class Verify(_Msg):
    pass


class Dump(_Msg):
    directory: str


class Stop(_Msg):
    pass


class Ack(_Msg):
    pass


class RunReport(_Msg):
    start_ns: int = 0
    end_ns: int = 0
    num_bytes: int = 0
    num_descriptors: int = 0
    nixl_descriptors: int = 0
    num_transfers: int = 0
    post_us: int = 0
    plan_us: float = 0.0
    receive_end_ns: int = 0  # staged: when this receiver finished scattering
    # staged: when each step ended (monotonic ns, shared by the processes), see staged.PHASES
    phases_ns: dict[str, int] = {}


class Verified(_Msg):
    ok: bool
    detail: str
    num_bytes: int


class Calibrate(_Msg):
    """prefill0 probes decode0's staging buffer to calibrate the cost model."""

    probe_bytes: int


class Calibrated(_Msg):
    per_transfer_s: float
    per_descriptor_s: float
    read_bytes_per_s: float
    write_bytes_per_s: float
    copy_bytes_per_s: float


class Failed(_Msg):
    kind: str
    message: str


ToRank = Peers | Prepare | Scramble | Run | Deliver | PingPong | Verify | Dump | Calibrate | Stop
FromRank = Hello | Ack | RunReport | Latency | Verified | Calibrated | Failed

TO_RANK = msgspec.msgpack.Decoder(ToRank)
FROM_RANK = msgspec.msgpack.Decoder(FromRank)
ENCODER = msgspec.msgpack.Encoder()
