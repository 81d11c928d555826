"""Coordinator <-> rank messages of `kvxfer bench`: one tagged union each way, sent as msgspec
bytes over the daemons' command bus (`kvxfer.daemons.bus`: its pipes, liveness checks and
`Failed` replies). Local only; the authenticated side channel is for real deployments."""

from __future__ import annotations

import msgspec

from kvxfer.agents.messages import EngineInfo
from kvxfer.bench.config import PlanKind, Strategy
from kvxfer.daemons.bus import Failed


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    pass


class Hello(_Msg, frozen=True):
    """A rank's handshake (its endpoint's `EngineInfo`, as the daemons exchange it) and the
    request's blocks in its cache, sent once after it registered its memory."""

    info: EngineInfo
    block_ids: list[int]  # flattened; [2, n] for separate K/V pages


class Peers(_Msg, frozen=True):
    hellos: list[Hello]


class Scramble(_Msg, frozen=True):
    """Overwrite the decode cache (so a verified run proves this run wrote it); snapshot it for
    --dump when `snapshot`."""

    snapshot: bool


class Reserve(_Msg, frozen=True):
    """Staged: decode ranks build their parts and reserve a staging slot for them."""


class Reserved(_Msg, frozen=True):
    offsets: list[int] = []  # where each source writes, in `sources_of` order (decode ranks)
    seconds: float = 0.0  # staged_parts + reserve


class Run(_Msg, frozen=True):
    strategy: Strategy
    plan: PlanKind
    staging_offsets: dict[int, list[int]] = {}  # staged: each decode rank's `Reserved.offsets`


class PingPong(_Msg, frozen=True):
    """decode0 sends `count` notifications to prefill0, each echoed back before the next."""

    count: int


class Latency(_Msg, frozen=True):
    rtt_us: list[float]


class Verify(_Msg, frozen=True):
    pass


class Dump(_Msg, frozen=True):
    directory: str


class Ack(_Msg, frozen=True):
    pass


class RunReport(_Msg, frozen=True):
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


class Verified(_Msg, frozen=True):
    ok: bool
    detail: str
    num_bytes: int


class Calibrate(_Msg, frozen=True):
    """prefill0 probes decode0's staging probe area (`Endpoint.calibrate`) for the cost model."""


class Calibrated(_Msg, frozen=True):
    per_transfer_s: float
    per_descriptor_s: float
    read_bytes_per_s: float
    write_bytes_per_s: float
    copy_bytes_per_s: float


ToRank = Peers | Scramble | Reserve | Run | PingPong | Verify | Dump | Calibrate
FromRank = Hello | Ack | Reserved | RunReport | Latency | Verified | Calibrated | Failed

TO_RANK = msgspec.msgpack.Decoder(ToRank)
FROM_RANK = msgspec.msgpack.Decoder(FromRank)
ENCODER = msgspec.msgpack.Encoder()
