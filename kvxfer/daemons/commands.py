"""The commands rank 0 of a service sends its ranks over the command bus (`bus.py`), and their
replies: msgspec Structs, one tagged union each way. Collective where the engine is (prefill,
decode), per rank where transfers are (connect, pull, push, staging)."""

from __future__ import annotations

import msgspec

from kvxfer.agents import messages as m
from kvxfer.daemons.bus import Failed


class Prefill(msgspec.Struct, tag="prefill", frozen=True):
    token_ids: list[int]
    block_ids: list[int]
    temperature: float = 0.0
    seed: int = 0


class Decode(msgspec.Struct, tag="decode", frozen=True):
    token_id: int
    block_ids: list[int]
    num_cached: int
    temperature: float = 0.0
    seed: int = 0


class Connect(msgspec.Struct, tag="connect", frozen=True):
    """Decode ranks: handshake (cached per boot epoch) with every prefill rank they pair with."""

    params: m.TransferParams


class Pull(msgspec.Struct, tag="pull", frozen=True):
    """Decode ranks, READ mode: read the request's heads into `block_ids`."""

    params: m.TransferParams
    block_ids: list[int]


class AwaitPush(msgspec.Struct, tag="await_push", frozen=True):
    """Decode ranks, WRITE mode: wait until every producer rank notified its push; `staged`:
    then scatter the parts from the slot `Reserve` took, and give it back."""

    params: m.TransferParams
    timeout_s: float
    staged: bool = False


class Reserve(msgspec.Struct, tag="reserve", frozen=True):
    """Decode ranks, staged WRITE: a staging slot for this rank's parts of the request."""

    params: m.TransferParams
    block_ids: list[int]


class Unreserve(msgspec.Struct, tag="unreserve", frozen=True):
    """Decode ranks: a staged request failed; its slot goes back after `delay_s`, when no late
    write from a producer can still land in it."""

    request_id: str
    delay_s: float


class Push(msgspec.Struct, tag="push", frozen=True):
    """Prefill ranks, WRITE mode: push the request's heads into decode rank `decode_rank`."""

    request_id: str
    decode_engine_id: str
    decode_rank: int
    decode_block_ids: list[int]
    block_ids: list[int]
    num_tokens: int
    decode_tp: int
    staging_offsets: list[int] | None = None  # staged: per source of decode_rank (WriteRequest)
    # The CURVE key the WriteRequest came with: a rank pushes only to a decode engine that
    # handshook with that same key (a consumer cannot aim the push at another service's memory).
    requester_key: str | None = None
    not_after_unix: float | None = None  # WriteRequest: refuse to start after this wall-clock time


class Describe(msgspec.Struct, tag="describe", frozen=True):
    pass


class Token(msgspec.Struct, tag="token", frozen=True):
    token: int


class Moved(msgspec.Struct, tag="moved", frozen=True):
    num_bytes: int = 0
    num_descriptors: int = 0
    seconds: float = 0.0


class Described(msgspec.Struct, tag="described", frozen=True):
    info: m.EngineInfo
    side_channel: str
    pid: int


class Ok(msgspec.Struct, tag="ok", frozen=True):
    pass


class Reserved(msgspec.Struct, tag="reserved", frozen=True):
    offsets: list[int]  # where each source writes in this rank's slots area; empty: not staged


Command = Prefill | Decode | Connect | Pull | AwaitPush | Push | Describe | Reserve | Unreserve
Reply = Token | Moved | Described | Ok | Failed | Reserved
command_encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(Command)
reply_decoder = msgspec.msgpack.Decoder(Reply)
