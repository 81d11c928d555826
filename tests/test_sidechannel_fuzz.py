"""Hostile input against a real side-channel listener: it must answer or drop, never stop.

KVXFER_FUZZ_INPUTS (default 10,000) sets how many inputs in all: a fifth are structured
mutations of every message type drawn by hypothesis, most of the rest are raw byte mutations of
valid messages, and a few hundred are malformed envelopes (wrong frame counts, bad call ids,
oversized frames). A long run: `KVXFER_FUZZ_INPUTS=100000 pytest tests/test_sidechannel_fuzz.py`.
The fuzzer holds an allowed CURVE key: the worst case is an authenticated peer gone bad.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sidechannel_support import Keys

from kvxfer.agents import messages as m
from kvxfer.agents.compat import check_compatible
from kvxfer.agents.sidechannel import CALL_ID_BYTES, PeerInfo, SideChannelClient, SideChannelServer
from kvxfer.layouts import LAYOUTS, describe

FUZZ_INPUTS = int(os.environ.get("KVXFER_FUZZ_INPUTS", "10000"))
NUM_STRUCTURED = FUZZ_INPUTS // 5
NUM_ENVELOPES = min(500, FUZZ_INPUTS // 20)
NUM_OVERSIZED = 10
NUM_RAW = FUZZ_INPUTS - NUM_STRUCTURED - NUM_ENVELOPES - NUM_OVERSIZED
MAX_MESSAGE_BYTES = 64 << 10
REPLY_TIMEOUT_S = 10.0
SEED = int(os.environ.get("KVXFER_FUZZ_SEED", "20261121"))


def local_desc() -> m.RegionInfo:
    desc = describe("flashinfer-hnd", num_layers=2, num_blocks=64, block_size=16, num_heads=4, head_dim=16, dtype="float16")
    return m.RegionInfo(desc=desc, layer_addrs=[1 << 20, 2 << 20])


LOCAL = m.HandshakeReply(
    engine=m.EngineInfo(
        engine_id="prefill-0",
        boot_epoch=3,
        role=m.Role.PREFILL,
        tp_size=1,
        tp_rank=0,
        model_fingerprint="tiny",
        agent_name="agent-p0",
        agent_metadata=b"nixl",
        regions=[local_desc()],
    )
)


def handler(peer: PeerInfo, msg: m.Message) -> m.Message:
    """What a producer does with each message, minus NIXL: real compat and block-id checks."""
    match msg:
        case m.HandshakeRequest():
            check_compatible(LOCAL, msg, peer=peer.address)
            return LOCAL
        case m.LeaseRenew():
            return m.LeaseRenewed(renewed=msg.request_ids[:1], unknown=tuple(msg.request_ids[1:]))
        case _:
            return m.Ack()


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def server(keys: Keys) -> Iterator[SideChannelServer]:
    with SideChannelServer(keys.server_config(max_message_bytes=MAX_MESSAGE_BYTES), handler) as srv:
        yield srv


class RawPeer:
    """A DEALER that sends arbitrary frames and collects replies by call id."""

    def __init__(self, address: str, keys: Keys, ctx: zmq.Context):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.curve_secretkey = keys.client.secret
        self.sock.curve_publickey = keys.client.public
        self.sock.curve_serverkey = keys.server.public
        self.sock.connect(address)
        self.pending: set[bytes] = set()

    def send(self, frames: list[bytes]) -> None:
        if len(frames) == 2 and len(frames[0]) == CALL_ID_BYTES:
            self.pending.add(frames[0])
        self.sock.send_multipart(frames)

    def send_body(self, body: bytes) -> None:
        self.send([os.urandom(CALL_ID_BYTES), body])

    def collect(self) -> None:
        """Wait for a decodable reply to every well-formed envelope sent so far."""
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while self.pending:
            assert self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), (
                f"{len(self.pending)} repl(ies) missing: the listener stopped answering"
            )
            call_id, body = self.sock.recv_multipart()
            m.decode(body)  # every reply is a valid message
            self.pending.discard(call_id)

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture(scope="module")
def raw(server: SideChannelServer, keys: Keys) -> Iterator[RawPeer]:
    ctx = zmq.Context()
    peer = RawPeer(server.address, keys, ctx)
    yield peer
    peer.close()
    ctx.term()


def assert_still_serving(server: SideChannelServer, keys: Keys) -> None:
    with SideChannelClient(server.address, keys.client_config()) as client:
        engine = msgspec.structs.replace(LOCAL.engine, engine_id="decode-0", role=m.Role.DECODE)
        reply = client.request(m.HandshakeRequest(engine=engine), timeout_s=REPLY_TIMEOUT_S)
    assert reply == LOCAL
    stats = server.stats()
    assert stats.internal_errors == 0 and stats.handler_errors == 0, stats


def wait_until(done: Callable[[], bool], timeout_s: float = REPLY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.01)


# -- structured: every message type, drawn and then mutated as data ----------------------------

def regions() -> st.SearchStrategy[m.RegionInfo]:
    def build(layout: str, heads: int, block_size: int, patch: dict[str, int], addrs: list[int]) -> m.RegionInfo:
        desc = describe(layout, num_layers=2, num_blocks=64, block_size=block_size,
                        num_heads=1 if layout == "mla" else heads, head_dim=16, dtype="float16")
        return m.RegionInfo(desc=msgspec.structs.replace(desc, **patch), layer_addrs=addrs)

    fields = st.sampled_from(["num_layers", "num_blocks", "block_size", "num_heads", "first_head", "total_heads",
                              "head_dim", "block_stride", "kv_stride", "head_stride", "token_stride", "layer_bytes"])
    patch = st.dictionaries(fields, st.integers(-(2**40), 2**40), max_size=2)
    return st.builds(build, st.sampled_from(sorted(LAYOUTS)), st.sampled_from([1, 2, 4, 8]),
                     st.sampled_from([1, 16, 32]), patch, st.lists(st.integers(0, 2**48), max_size=3))


def engines() -> st.SearchStrategy[m.EngineInfo]:
    return st.builds(
        m.EngineInfo,
        engine_id=st.text(max_size=12), boot_epoch=st.integers(0, 2**63 - 1), role=st.sampled_from(m.Role),
        tp_size=st.integers(1, 16), tp_rank=st.integers(0, 16), model_fingerprint=st.sampled_from(["tiny", "big"]),
        agent_name=st.text(max_size=8), agent_metadata=st.binary(max_size=32), regions=st.lists(regions(), max_size=2),
        modes=st.lists(st.sampled_from(m.Mode), max_size=2).map(tuple),
    )


RIDS = st.text(min_size=1, max_size=40)
STATUS = st.sampled_from(m.Status)
MESSAGES: st.SearchStrategy[m.Message] = st.one_of(
    st.builds(m.HandshakeRequest, engine=engines()),
    st.builds(m.HandshakeReply, engine=engines()),
    st.builds(m.LeaseRenew, request_ids=st.lists(RIDS, max_size=4)),
    st.builds(m.LeaseRenewed, renewed=st.lists(RIDS, max_size=3)),
    st.builds(m.Abort, request_id=RIDS, reason=st.text(max_size=20), error_kind=st.text(max_size=8)),
    st.builds(m.Ack, request_id=RIDS),
    st.builds(m.ErrorReply, kind=st.text(max_size=8), message=st.text(max_size=20)),
    st.builds(m.Ping, nonce=st.integers(0, 2**63 - 1)),
    st.builds(m.Pong, nonce=st.integers(0, 2**63 - 1)),
)
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def paths(obj: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every key path into a decoded msgpack tree."""
    children: list[tuple[object, object]] = []
    if isinstance(obj, dict):
        children = list(obj.items())
    elif isinstance(obj, list):
        children = list(enumerate(obj))
    out = [prefix + (key,) for key, _ in children]
    for key, child in children:
        out += paths(child, prefix + (key,))
    return out


def mutate(tree: dict[str, object], data: st.DataObject) -> dict[str, object]:
    where = paths(tree)
    path = data.draw(st.sampled_from(where))
    parent: object = tree
    for key in path[:-1]:
        parent = parent[key]  # type: ignore[index]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace" or isinstance(parent, list):
        parent[path[-1]] = data.draw(JUNK)  # type: ignore[index]
    elif action == "delete":
        del parent[path[-1]]  # type: ignore[union-attr]
    else:
        parent[data.draw(st.text(max_size=6))] = data.draw(JUNK)  # type: ignore[index]
    return tree


def test_structured_mutations_of_every_message_type(server: SideChannelServer, raw: RawPeer, keys: Keys) -> None:
    before = server.stats().received

    @settings(max_examples=NUM_STRUCTURED, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(msg=MESSAGES, data=st.data(), num_mutations=st.integers(0, 3))
    def send_one(msg: m.Message, data: st.DataObject, num_mutations: int) -> None:
        tree = msgspec.to_builtins(msg, builtin_types=(bytes,))
        for _ in range(num_mutations):
            tree = mutate(tree, data)
        raw.send_body(msgspec.msgpack.encode(tree))
        raw.collect()

    send_one()
    assert server.stats().received - before >= NUM_STRUCTURED
    assert_still_serving(server, keys)


# -- raw bytes: valid messages, mutated byte by byte --------------------------------------------

def corpus() -> list[bytes]:
    rng = random.Random(SEED)
    engine = LOCAL.engine
    return [
        m.encode(m.HandshakeRequest(engine=msgspec.structs.replace(engine, role=m.Role.DECODE))),
        m.encode(LOCAL),
        m.encode(m.Abort(request_id=m.new_request_id(), reason="failed", error_kind="timeout")),
        m.encode(m.LeaseRenew(request_ids=[m.new_request_id() for _ in range(3)])),
        m.encode(m.Abort(request_id="r", reason="gone")),
        m.encode_notif(m.PushAsk(request_id="r", decode_rank=1, block_ids=list(range(40)), decode_engine_id="d",
                                 not_after_unix=1.7e9, mac="0" * 32)),
        m.encode(m.Ping(nonce=rng.getrandbits(63))),
        m.encode_notif(m.XferNotif(request_id="r", rank=0)),
        m.encode_notif(m.XferNotif(request_id="r", rank=1, status=m.Status.ERROR, kind=m.NotifKind.PUSHED)),
    ]


def byte_mutation(body: bytes, other: bytes, rng: random.Random) -> bytes:
    data = bytearray(body)
    op = rng.randrange(9)
    pos = rng.randrange(len(data) + 1)
    if op == 0:  # flip a few bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # overwrite bytes with interesting values
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.choice([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF])
    elif op == 2:  # truncate
        del data[pos:]
    elif op == 3:  # insert random bytes
        data[pos:pos] = rng.randbytes(rng.randint(1, 16))
    elif op == 4:  # duplicate a slice
        a = rng.randrange(len(data))
        data[pos:pos] = data[a:a + rng.randint(1, 32)]
    elif op == 5:  # splice two messages
        data = data[:pos] + other[rng.randrange(len(other) + 1):]
    elif op == 6:  # random bytes
        data = bytearray(rng.randbytes(rng.randint(0, 64)))
    elif op == 7:  # huge declared lengths
        data[pos:pos] = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff", b"\xdb\xff\xff\xff\xff"])
    else:  # deep nesting
        data[pos:pos] = b"\x91" * rng.randint(100, 5000)
    return bytes(data)


def test_raw_byte_mutations(server: SideChannelServer, raw: RawPeer, keys: Keys) -> None:
    rng = random.Random(SEED)
    bodies = corpus()
    before = server.stats().received
    for i in range(NUM_RAW):
        body = rng.choice(bodies)
        for _ in range(rng.randint(1, 3)):
            body = byte_mutation(body, rng.choice(bodies), rng) or b"\x00"
        raw.send_body(body)
        if i % 64 == 63:
            raw.collect()
    raw.collect()
    assert server.stats().received - before == NUM_RAW
    assert_still_serving(server, keys)


# -- envelopes: frames the protocol does not have -----------------------------------------------

def bad_envelope(rng: random.Random) -> list[bytes]:
    body = m.encode(m.Ping())
    return rng.choice([
        [body],  # no call id
        [os.urandom(CALL_ID_BYTES), body, body],  # a frame too many
        [os.urandom(CALL_ID_BYTES), body, b"", b"x"],
        [os.urandom(rng.choice([0, 1, 7, 9, 64])), body],  # call id of the wrong size
        [b"", b""],
        [os.urandom(CALL_ID_BYTES), b""],  # empty body (answered: malformed)
    ])


def test_malformed_envelopes_and_oversized_frames(server: SideChannelServer, raw: RawPeer, keys: Keys) -> None:
    rng = random.Random(SEED)
    before = server.stats()
    for _ in range(NUM_ENVELOPES):
        raw.send(bad_envelope(rng))
    raw.collect()
    wait_until(lambda: server.stats().received - before.received >= NUM_ENVELOPES)
    after = server.stats()
    assert after.received - before.received == NUM_ENVELOPES
    assert after.malformed - before.malformed == NUM_ENVELOPES
    ctx = zmq.Context()
    try:
        for _ in range(NUM_OVERSIZED):  # ZeroMQ drops the connection: the message never arrives
            peer = RawPeer(server.address, keys, ctx)
            peer.sock.send_multipart([os.urandom(CALL_ID_BYTES), b"\x00" * (MAX_MESSAGE_BYTES + 1)])
            time.sleep(0.01)
            peer.close()
    finally:
        ctx.term()
    assert_still_serving(server, keys)


def test_unauthenticated_garbage_reaches_nothing(server: SideChannelServer, keys: Keys) -> None:
    before = server.stats()
    ctx = zmq.Context()
    try:
        stranger = ctx.socket(zmq.DEALER)
        stranger.linger = 0
        stranger.curve_secretkey, stranger.curve_publickey = keys.stranger.secret, keys.stranger.public
        stranger.curve_serverkey = keys.server.public
        stranger.connect(server.address)
        plain = ctx.socket(zmq.DEALER)
        plain.linger = 0
        plain.connect(server.address)
        rng = random.Random(SEED)
        for sock in (stranger, plain):
            for body in corpus():
                try:
                    sock.send_multipart([os.urandom(CALL_ID_BYTES), byte_mutation(body, body, rng)], flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
            assert not sock.poll(300), "an unauthenticated peer got a reply"
        stranger.close()
        plain.close()
    finally:
        ctx.term()
    after = server.stats()
    assert after.received == before.received
    assert after.auth_refused > before.auth_refused
    assert_still_serving(server, keys)
