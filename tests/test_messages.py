"""Side-channel messages: round trips, version first, schema evolution, hostile bounds."""

from __future__ import annotations

import msgspec
import pytest

from kvxfer.agents import messages as m
from kvxfer.layouts import describe


def engine_info(**overrides: object) -> m.EngineInfo:
    desc = describe("flashinfer-hnd", num_layers=2, num_blocks=8, block_size=16, num_heads=2, head_dim=8, dtype="float16")
    fields: dict[str, object] = dict(
        engine_id="prefill-0",
        boot_epoch=7,
        role=m.Role.PREFILL,
        tp_size=1,
        tp_rank=0,
        model_fingerprint="llama-tiny",
        agent_name="agent-p0",
        agent_metadata=b"\x00nixl-metadata\xff",
        regions=[m.RegionInfo(desc=desc, layer_addrs=[4096, 1 << 40], device_id=0)],
        modes=(m.Mode.READ, m.Mode.WRITE),
    )
    fields.update(overrides)
    return m.EngineInfo(**fields)  # type: ignore[arg-type]


def examples() -> list[m.Message]:
    rid = m.new_request_id()
    return [
        m.HandshakeRequest(engine=engine_info(role=m.Role.DECODE)),
        m.HandshakeReply(engine=engine_info(), params_key=b"k" * 32),
        m.LeaseRenew(request_ids=[rid, m.new_request_id()]),
        m.LeaseRenewed(renewed=[rid], unknown=("gone",), expires_unix_ms=1_700_000_000_000),
        m.Abort(request_id=rid, reason="client went away"),
        m.Abort(request_id=rid, reason="late", error_kind="timeout"),
        m.Ack(request_id=rid),
        m.ErrorReply(kind="lease", message="request expired"),
        m.Ping(nonce=42),
        m.Pong(nonce=42, engine_id="prefill-0", boot_epoch=7),
    ]


def test_every_member_of_the_union_has_an_example() -> None:
    assert {type(x) for x in examples()} == set(m.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", examples(), ids=lambda x: type(x).__name__)
def test_round_trip(msg: m.Message) -> None:
    assert m.decode(m.encode(msg)) == msg


@pytest.mark.parametrize("msg", examples(), ids=lambda x: type(x).__name__)
def test_tag_then_protocol_version_lead_every_message(msg: m.Message) -> None:
    keys = list(msgspec.msgpack.decode(m.encode(msg)).keys())
    assert keys[:2] == ["t", "protocol_version"]


def test_tags_are_short_and_unique() -> None:
    tags = [cls.__struct_config__.tag for cls in m.MESSAGE_TYPES]
    assert len(set(tags)) == len(tags)


def test_appended_field_is_ignored_by_an_old_peer() -> None:
    class PingV2(msgspec.Struct, frozen=True, kw_only=True, tag_field="t", tag="ping"):
        protocol_version: int = m.PROTOCOL_VERSION
        nonce: int = 0
        deadline_ms: int = 250  # a field a newer peer appended

    assert m.decode(msgspec.msgpack.encode(PingV2(nonce=5))) == m.Ping(nonce=5)


def test_missing_field_with_default_is_filled_for_an_old_peer() -> None:
    old = {"t": "abort", "protocol_version": m.PROTOCOL_VERSION, "request_id": "ab"}
    assert m.decode(msgspec.msgpack.encode(old)) == m.Abort(request_id="ab", reason="", error_kind="")


def test_unknown_tag_is_an_error_and_its_version_can_still_be_read() -> None:
    newer = msgspec.msgpack.encode({"t": "teleport", "protocol_version": 9})
    with pytest.raises(msgspec.DecodeError, match="teleport"):
        m.decode(newer)
    assert m.probe_version(newer) == 9
    assert m.probe_version(b"\xff\x00") is None


@pytest.mark.parametrize(
    "patch, path",
    [
        ({"tp_rank": -1}, "tp_rank"),
        ({"tp_size": 0}, "tp_size"),
        ({"boot_epoch": -5}, "boot_epoch"),
        ({"engine_id": "x" * 300}, "engine_id"),
        ({"role": "observer"}, "role"),
        ({"modes": ["teleport"]}, "modes"),
    ],
)
def test_out_of_bounds_fields_are_refused_naming_the_path(patch: dict[str, object], path: str) -> None:
    raw = msgspec.to_builtins(m.HandshakeRequest(engine=engine_info()), builtin_types=(bytes,))
    raw["engine"].update(patch)
    with pytest.raises(msgspec.ValidationError, match=rf"\$\.engine\.{path}"):
        m.decode(msgspec.msgpack.encode(raw))


def test_negative_layer_address_is_refused() -> None:
    raw = msgspec.to_builtins(m.HandshakeReply(engine=engine_info()), builtin_types=(bytes,))
    raw["engine"]["regions"][0]["layer_addrs"][1] = -1
    with pytest.raises(msgspec.ValidationError, match=r"layer_addrs\[1\]"):
        m.decode(msgspec.msgpack.encode(raw))


def test_deep_nesting_is_a_decode_error_not_a_recursion_error() -> None:
    body = b"\x82\xa1t\xa4ping\xa1x" + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(msgspec.DecodeError):
        m.decode(body)


def test_notification_is_a_compact_versioned_array() -> None:
    notif = m.XferNotif(request_id="a" * 32, rank=3)
    data = m.encode_notif(notif)
    assert msgspec.msgpack.decode(data) == [m.PROTOCOL_VERSION, "a" * 32, 3, "ok", "", "done", ""]
    assert len(data) < 48
    assert m.decode_notif(data) == notif
    with pytest.raises(msgspec.DecodeError):
        m.decode_notif(b"req-1:3")  # never the "req:n" strings of other connectors


def test_a_push_request_is_the_notification_that_is_a_map() -> None:
    ask = m.PushAsk(request_id="a" * 32, decode_rank=2, block_ids=[7, 3], decode_engine_id="decode0",
                    staging_offsets=[4096], not_after_unix=1.7e9, mac="f" * 32)
    data = m.encode_notif(ask)
    assert list(msgspec.msgpack.decode(data))[0] == "protocol_version"
    assert m.decode_notif(data) == ask
    refused = m.XferNotif(request_id="a" * 32, rank=1, status=m.Status.ERROR, error_kind="lease",
                          kind=m.NotifKind.PUSHED, message="its lease has ended")
    assert m.decode_notif(m.encode_notif(refused)) == refused
    with pytest.raises(msgspec.ValidationError, match="decode_rank"):  # a map must be a whole PushAsk
        m.decode_notif(msgspec.msgpack.encode({"protocol_version": 3, "request_id": "r", "block_ids": [],
                                              "decode_engine_id": "d", "not_after_unix": 0.0}))
    with pytest.raises(msgspec.ValidationError):
        m.decode_notif(msgspec.msgpack.encode({**msgspec.to_builtins(ask), "block_ids": [-1]}))


def test_request_ids_are_128_random_bits() -> None:
    ids = {m.new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(x) == 32 and int(x, 16) >= 0 for x in ids)


def test_transfer_params_round_trip_as_json_with_binding() -> None:
    params = m.TransferParams(
        engine_id="prefill-0",
        boot_epoch=3,
        request_id=m.new_request_id(),
        block_ids=[1, 2, 3],
        side_channel="tcp://127.0.0.1:5600",
        tp_size=2,
        binding=m.Binding(consumer_key="k" * 40, consumer_engine_id="decode-1"),
    )
    assert m.decode_params(m.encode_params(params)) == params
    with pytest.raises(msgspec.ValidationError, match=r"block_ids\[0\]"):
        m.decode_params(m.encode_params(params).replace(b"[1,2,3]", b"[-1,2,3]"))


def test_version_1_messages_are_refused_with_their_version_readable():
    """Version 2 retired Claim, TransferDone and WriteDone: a version 1 peer's message does not
    decode, and the server can still read which version it speaks to say so (field by field at
    handshake, `compat`)."""
    old = msgspec.msgpack.encode({"t": "claim", "protocol_version": 1, "request_id": "r" * 32,
                                  "block_ids": [1, 2], "num_tokens": 20})
    with pytest.raises(msgspec.DecodeError, match="claim"):
        m.decode(old)
    assert m.probe_version(old) == 1
