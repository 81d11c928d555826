"""Everything that crosses the side channel: one msgspec tagged union, one decoder.

Wire format: each message is a msgpack map tagged by `"t"` (a short, stable tag per type), with
`protocol_version` as its first field. NIXL notification payloads (`XferNotif`) are msgpack too,
as a compact array. Nothing is ever pickled.

Schema-evolution rules (read before changing anything here):

1. A new field is appended at the end of its Struct and has a default; old peers ignore it
   (unknown map keys are skipped) and new peers fill the default when an old peer omits it.
2. Fields are never renamed, removed, re-typed or re-ordered, and tags are never reused. Retire a
   field by keeping it and ignoring it.
3. A new message type gets a new tag. An old peer that receives it answers
   `ErrorReply(kind="malformed")`, so a sender must only send it to peers whose handshake shows
   they understand it (protocol version, or an advertised capability field).
4. Anything else (changed meaning of a field, a required new field) bumps `PROTOCOL_VERSION`;
   peers refuse each other at handshake, field by field (`kvxfer.agents.compat`).

Version 2 (the one-protocol release) retired what nothing sent or read (`Claim`, `WriteDone`,
`TransferDone`, `EngineInfo.read_gbps/write_gbps`, `TransferParams.lease_expires_s`) and gave each
message one meaning: `Abort` ends a lease early (the consumer gave up or needs nothing), the
NIXL notification `XferNotif(kind=DONE)` from every consumer rank confirms it, `LeaseRenew` is the
heartbeat. Version 3 moved the push request off the side channel: `PushAsk`, a NIXL notification
under a MAC, asks one producer rank for one push (it retired `WriteRequest`, tag "write"), and a
refused push's `XferNotif(kind=PUSHED)` carries the refusal's message.

Security: request ids are `new_request_id()` (128 random bits). Everything that acts on a
request over the side channel (`LeaseRenew`, `Abort`) is attributed by the server to the
authenticated CURVE key of the connection it arrived on, never to a field inside the message, and
a producer honours it only when that key matches the request's `Binding`. A `PushAsk` travels
outside the side channel, so it carries a MAC under the asking consumer's own key
(`kvxfer.agents.capability.ask_key`, from its handshake): the producer checks it against the
consumer whose handshake named the sending NIXL agent before it reads anything else. Transfer parameters carry a MAC
(`kvxfer.agents.capability`) that a consumer rank checks with the key its producer gave it at
handshake, so a READ needs no round trip to refuse forged parameters (docs/security.md).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, TypeVar, get_args

import msgspec

from kvxfer.layouts import CacheDesc

PROTOCOL_VERSION = 3
T = TypeVar("T")

# Bounds that keep a hostile message from asking for absurd work; decoding refuses values outside.
# Addresses and epochs: msgspec bounds must fit an int64; real user-space addresses are < 2**57.
U64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Rank = Annotated[int, msgspec.Meta(ge=0, le=65535)]
TpSize = Annotated[int, msgspec.Meta(ge=1, le=65536)]
ShortStr = Annotated[str, msgspec.Meta(max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
BlockIds = Annotated[list[Count], msgspec.Meta(max_length=1 << 20)]
Metadata = Annotated[bytes, msgspec.Meta(max_length=16 << 20)]
SecretKey = Annotated[bytes, msgspec.Meta(max_length=64)]
Mac = Annotated[str, msgspec.Meta(max_length=64)]


def new_request_id() -> str:
    """An unguessable request id: 128 random bits as 32 hex characters."""
    return secrets.token_hex(16)


class Role(Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class Mode(Enum):
    READ = "read"  # decode pulls from prefill
    WRITE = "write"  # prefill pushes into blocks decode allocated


class MemoryKind(Enum):
    DRAM = "DRAM"
    VRAM = "VRAM"


class Status(Enum):
    OK = "ok"
    ERROR = "error"


class RegionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One registered cache: its description and where each layer lives on its owner."""

    desc: CacheDesc
    layer_addrs: Annotated[list[U64], msgspec.Meta(max_length=4096)]  # [num_layers]
    device_id: Count = 0
    memory: MemoryKind = MemoryKind.DRAM


class StagingInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A rank's registered staging buffer. Calibration probes may read and write the probe area
    (it never holds data); staged WRITEs fill the slots area, at offsets its owner hands out."""

    probe_addr: U64
    probe_bytes: U64
    slots_addr: U64
    slots_bytes: U64  # every slot, back to back
    device_id: Count = 0
    memory: MemoryKind = MemoryKind.DRAM


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What one rank tells a peer about itself at handshake."""

    engine_id: ShortStr
    boot_epoch: U64  # changes on every restart: a new epoch means re-handshake
    role: Role
    tp_size: TpSize
    tp_rank: Rank
    model_fingerprint: ShortStr
    agent_name: ShortStr  # NIXL agent name
    agent_metadata: Metadata  # NIXL agent metadata, so the peer can load_remote_agent
    regions: Annotated[list[RegionInfo], msgspec.Meta(max_length=64)]
    modes: Annotated[tuple[Mode, ...], msgspec.Meta(max_length=8)] = (Mode.READ,)
    staging: StagingInfo | None = None  # None: no staged transfers with this rank


class Binding(msgspec.Struct, frozen=True, kw_only=True):
    """Who may act on a request: the consumer's CURVE public key (Z85), or with `insecure=True`
    servers only its engine id. A producer compares it with the authenticated peer."""

    consumer_key: ShortStr = ""
    consumer_engine_id: ShortStr = ""


class _Base(msgspec.Struct, frozen=True, tag_field="t"):
    """Not kw_only, so that `protocol_version` stays the first field of every message."""

    protocol_version: int = PROTOCOL_VERSION


class HandshakeRequest(_Base, frozen=True, kw_only=True, tag="hs"):
    engine: EngineInfo


class HandshakeReply(_Base, frozen=True, kw_only=True, tag="hs_ok"):
    engine: EngineInfo
    # The key this consumer checks transfer parameters bound to it with (`capability`); sent
    # only over the authenticated, encrypted channel, derived per consumer identity.
    params_key: SecretKey = b""
    # Set when the producer also grants unbound requests (insecure mode): their parameters' key.
    unbound_params_key: SecretKey = b""


class LeaseRenew(_Base, frozen=True, kw_only=True, tag="renew"):
    """Heartbeat: keep these requests' blocks held a while longer."""

    request_ids: Annotated[list[RequestId], msgspec.Meta(max_length=4096)]


class LeaseRenewed(_Base, frozen=True, kw_only=True, tag="renewed"):
    renewed: Annotated[list[RequestId], msgspec.Meta(max_length=4096)]
    unknown: Annotated[tuple[RequestId, ...], msgspec.Meta(max_length=4096)] = ()  # expired or never held
    expires_unix_ms: U64 = 0  # the renewed leases now end then (producer's wall clock)


class Abort(_Base, frozen=True, kw_only=True, tag="abort"):
    """The consumer ends the lease now: it failed (`error_kind`), or needs nothing more."""

    request_id: RequestId
    reason: Text = ""
    error_kind: ShortStr = ""


class Ack(_Base, frozen=True, kw_only=True, tag="ack"):
    """Generic success reply for messages that need no data back (Abort)."""

    request_id: ShortStr = ""


class ErrorReply(_Base, frozen=True, kw_only=True, tag="err"):
    kind: ShortStr  # a KvxferError.kind, or "malformed", "version", "internal"
    message: Text


class Ping(_Base, frozen=True, kw_only=True, tag="ping"):
    nonce: U64 = 0


class Pong(_Base, frozen=True, kw_only=True, tag="pong"):
    nonce: U64 = 0
    engine_id: ShortStr = ""
    boot_epoch: U64 = 0


Message = (
    HandshakeRequest
    | HandshakeReply
    | LeaseRenew
    | LeaseRenewed
    | Abort
    | Ack
    | ErrorReply
    | Ping
    | Pong
)
MESSAGE_TYPES: tuple[type[_Base], ...] = get_args(Message)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


class _VersionProbe(msgspec.Struct):
    """Reads only the version of a message whose type we do not know (a newer peer's)."""

    protocol_version: int = 0


_probe = msgspec.msgpack.Decoder(_VersionProbe)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def _decode_with(decode: Callable[[Any], T], data: bytes | str) -> T:
    try:
        return decode(data)
    except RecursionError:  # msgspec raises it for deeply nested input: hostile, not a bug
        raise msgspec.DecodeError("input nested too deeply") from None
    except UnicodeDecodeError as err:  # and this for a string that is not UTF-8
        raise msgspec.DecodeError(f"a string is not valid UTF-8 (byte {err.start})") from None


def decode(data: bytes) -> Message:
    """Decode one side-channel message; raises msgspec.DecodeError (or ValidationError) naming
    the path of the bad field, e.g. "Expected `int`, got `str` - at `$.engine.tp_rank`"."""
    return _decode_with(_decoder.decode, data)


def probe_version(data: bytes) -> int | None:
    """The protocol version of an undecodable message, if it has one."""
    try:
        return _decode_with(_probe.decode, data).protocol_version
    except msgspec.DecodeError:
        return None


class NotifKind(Enum):
    PUSHED = "pushed"  # producer rank -> consumer rank: its WRITE into the consumer landed (or was refused)
    DONE = "done"  # consumer rank -> every producer rank: it has what it needed of the request


class XferNotif(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Payload of a NIXL notification: compact (a msgpack array), versioned, typed. Rules as above."""

    protocol_version: int = PROTOCOL_VERSION
    request_id: RequestId
    rank: Rank  # the sender's TP rank
    status: Status = Status.OK
    error_kind: ShortStr = ""
    kind: NotifKind = NotifKind.DONE
    message: Text = ""  # a PUSHED error: why (the refusal or failure, as the producer logged it)


class PushAsk(msgspec.Struct, frozen=True, kw_only=True):
    """WRITE mode, a NIXL notification from consumer rank `decode_rank` to one producer rank: push
    the request's KV into `block_ids`, which it allocated. A msgpack map (notifications that are
    arrays are `XferNotif`). `mac` (`capability.sign_ask`) covers every other field under the
    asking consumer's own key, so NIXL's unauthenticated sender name cannot be used to aim a push."""

    protocol_version: int = PROTOCOL_VERSION
    request_id: RequestId
    decode_rank: Rank
    block_ids: BlockIds
    decode_engine_id: ShortStr  # whose handshake (agent, cache, key) the producer pushes to
    # Staged: where in decode_rank's staging slots each of its sources (in `sources_of` order)
    # writes its part, gathered, with one descriptor; None: direct, into block_ids.
    staging_offsets: Annotated[list[U64], msgspec.Meta(max_length=65536)] | None = None
    # The consumer's wall clock when it stops waiting: a producer that only gets to the push
    # later (it was stalled) refuses it instead of writing into memory the consumer reused.
    not_after_unix: float
    mac: Mac = ""


Notif = XferNotif | PushAsk
_notif_decoder = msgspec.msgpack.Decoder(XferNotif)
_ask_decoder = msgspec.msgpack.Decoder(PushAsk)
_MSGPACK_MAPS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}  # fixmap, map 16, map 32


def encode_notif(notif: Notif) -> bytes:
    return _encoder.encode(notif)


def decode_notif(data: bytes) -> Notif:
    """A notification's payload: a map is a `PushAsk`, anything else must be an `XferNotif`
    (msgspec decodes untagged structs one type at a time, so the shape picks the type)."""
    if data and data[0] in _MSGPACK_MAPS:
        return _decode_with(_ask_decoder.decode, data)
    return _decode_with(_notif_decoder.decode, data)


class TransferParams(msgspec.Struct, frozen=True, kw_only=True):
    """What a producer hands back (through the proxy, as JSON) so a consumer can fetch a request.

    `binding` says which consumer may use them, `mac` proves the producer issued exactly these
    fields for that consumer (`kvxfer.agents.capability`: the consumer checks it locally, before
    any byte moves). A third party that learns them still has to authenticate with the bound
    CURVE key to act on them, and the producer's side channel refuses anyone else.
    """

    protocol_version: Count = PROTOCOL_VERSION  # bounded: parameters arrive as JSON from HTTP clients
    engine_id: ShortStr
    boot_epoch: U64
    request_id: RequestId
    block_ids: BlockIds
    side_channel: ShortStr  # "tcp://host:port"
    tp_size: TpSize
    binding: Binding = Binding()
    num_tokens: Count = 0
    first_token_id: Count | None = None  # the token prefill sampled; decode continues from it
    lease_s: float = 0.0  # the producer holds the blocks this long past the last renewal
    expires_unix_ms: U64 = 0  # when the lease ends unless renewed (producer's wall clock)
    mac: Mac = ""  # capability.sign: HMAC over every field above, with the binding's key
    # The producer's CURVE public key (Z85), for consumers given none up front (the vLLM
    # connector's drop-in mode); a wrong one fails the side channel's handshake.
    producer_key: ShortStr = ""


_params_decoder = msgspec.json.Decoder(TransferParams)


def encode_params(params: TransferParams) -> bytes:
    return msgspec.json.encode(params)


def decode_params(data: bytes | str) -> TransferParams:
    return _decode_with(_params_decoder.decode, data)
