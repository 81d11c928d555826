"""The commands rank 0 of a service sends its ranks over the command bus (`bus.py`), and their
replies: msgspec Structs, one tagged union each way. Collective where the engine is (prefill,
decode); a load is sent to every decode rank at once, and each then talks to its own producer
ranks directly."""

from __future__ import annotations

import msgspec

from kvxfer.agents import messages as m
from kvxfer.daemons.bus import Failed


class Prefill(msgspec.Struct, tag="prefill", frozen=True):
    """Every rank: compute the prompt's KV into `block_ids`, then hold it under the lease of
    `transfer_id`, bound to `binding` (each prefill rank holds its own: kvxfer.agents.producer)."""

    token_ids: list[int]
    block_ids: list[int]
    transfer_id: str
    binding: m.Binding
    temperature: float = 0.0
    seed: int = 0


class Decode(msgspec.Struct, tag="decode", frozen=True):
    token_id: int
    block_ids: list[int]
    num_cached: int
    temperature: float = 0.0
    seed: int = 0


class Load(msgspec.Struct, tag="load", frozen=True):
    """Every decode rank: load its share of the request into `block_ids` from its own producer
    ranks (kvxfer.agents.consumer), then confirm to every producer rank."""

    params: m.TransferParams
    block_ids: list[int]
    mode: m.Mode
    staged: bool  # WRITE: into a staging slot where one is free, else directly
    valid_until_ms: int  # the lease's latest known end (the heartbeat's)
    not_after_unix: float  # WRITE: producers start their pushes by then


class Describe(msgspec.Struct, tag="describe", frozen=True):
    pass


class AskLanding(msgspec.Struct, tag="ask_landing", frozen=True):
    """Every decode rank: which of these failed loads still have READs running (that may yet
    land in their blocks)?"""

    transfer_ids: list[str]


class StillLanding(msgspec.Struct, tag="still_landing", frozen=True):
    transfer_ids: list[str]


class Prepare(msgspec.Struct, tag="prepare", frozen=True):
    """Every decode rank: meet the producer `params` names (no request) before its first
    request: handshakes, NIXL connections, descriptor lists (kvxfer.daemons.warm)."""

    params: m.TransferParams


class Token(msgspec.Struct, tag="token", frozen=True):
    token: int
    expires_unix_ms: int = 0  # Prefill: when this rank's lease ends unless renewed


class Moved(msgspec.Struct, tag="moved", frozen=True):
    num_bytes: int = 0
    num_descriptors: int = 0
    seconds: float = 0.0
    staged: bool = False


class Prepared(msgspec.Struct, tag="prepared", frozen=True):
    handshake_s: float = 0.0
    connect_s: float = 0.0
    prepare_s: float = 0.0
    copiers_s: float = 0.0  # the staging copiers built (GPU; 0: none to build)


class Described(msgspec.Struct, tag="described", frozen=True):
    info: m.EngineInfo
    side_channel: str
    pid: int


class CountKernels(msgspec.Struct, tag="count_kernels", frozen=True):
    """Every rank: how many kernels it compiled before and after ready (kvxfer.kernels);
    `ready`: the service is ready now, so later compiles are on a request's path."""

    ready: bool


class Kernels(msgspec.Struct, tag="kernels", frozen=True):
    before_ready: int
    after_ready: int


Command = Prefill | Decode | Load | Describe | AskLanding | Prepare | CountKernels
Reply = Token | Moved | Described | StillLanding | Prepared | Kernels | Failed
command_encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(Command)
reply_decoder = msgspec.msgpack.Decoder(Reply)
