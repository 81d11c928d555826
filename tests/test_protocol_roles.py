"""The protocol's two roles (kvxfer.agents.producer, .consumer, .heartbeat) between two real NIXL
agents and a real side channel in one process, without the daemons around them: the bytes a READ
or a push moves, how each lease ends, renewals, and refusals before any transfer."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import torch

from kvxfer.agents import capability
from kvxfer.agents import messages as m
from kvxfer.agents.capability import Signer, identity_of_peer, master_secret
from kvxfer.agents.consumer import Consumer, Load
from kvxfer.agents.endpoint import Endpoint, Identity
from kvxfer.agents.heartbeat import Heartbeat, LeaseClient, Renewal
from kvxfer.agents.keys import KeyConfig, generate_keypair
from kvxfer.agents.leases import Outcome
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.nixl_agent import AgentConfig
from kvxfer.agents.producer import Held, Producer
from kvxfer.agents.sidechannel import ClientCache, ClientConfig, ServerConfig
from kvxfer.errors import AuthError, LeaseError, PeerGoneError, TransferTimeout
from kvxfer.layouts import describe
from kvxfer.ports import free_ports

pytestmark = pytest.mark.timeout(120)
LEASE_S = 1.0
BLOCK = 16


def endpoint(role: m.Role, name: str, fill: float, metrics: TransferMetrics | None = None, *,
             agent: str = "") -> Endpoint:
    desc = describe("flashinfer-hnd", num_layers=2, num_blocks=16, block_size=BLOCK, num_heads=2, head_dim=8,
                    dtype="float32")
    tensors = [torch.full(desc.shape, fill) + torch.rand(desc.shape) for _ in range(desc.num_layers)]
    identity = Identity(engine_id=name, boot_epoch=1, role=role, tp_size=1, tp_rank=0, model_fingerprint="fp")
    return Endpoint(identity, tensors, desc, agent_config=AgentConfig(name=agent or f"{name}-agent"), metrics=metrics)


class Pair:
    """A producer rank and a consumer rank, insecure side channel (CURVE has its own tests)."""

    def __init__(self) -> None:
        self.released: list[tuple[Held, Outcome]] = []
        self.ended = threading.Event()
        lock = self.producer_lock = threading.RLock()  # the producer rank's NIXL lock
        metrics = TransferMetrics()  # the producer rank's: its agent's transfers and its refusals
        self.prefill = endpoint(m.Role.PREFILL, "prefill0", 1.0, metrics)
        self.producer = Producer(self.prefill, signer=Signer(master_secret(None, engine_id="prefill0", boot_epoch=1)),
                                 lease_s=LEASE_S, metrics=metrics, on_release=self._released, nixl_lock=lock)
        self.port = free_ports(1)
        self.producer.start(ServerConfig(port=self.port, insecure=True, engine_id="prefill0", boot_epoch=1))
        self.decode = endpoint(m.Role.DECODE, "decode0", -1.0)
        clients = ClientCache(ClientConfig(insecure=True))
        self.leases = LeaseClient(clients, timeout_s=5.0)
        self.consumer = Consumer(self.decode, clients=clients, leases=self.leases, nixl_lock=threading.RLock(),
                                 identity=identity_of_peer(None, "decode0"), handshake_timeout_s=5.0,
                                 request_timeout_s=5.0)
        self._stop = threading.Event()
        self._idle = threading.Thread(target=self._drive, daemon=True)  # what a driver does between loads
        self._idle.start()

    def _drive(self) -> None:
        while not self._stop.wait(0.002):
            self.consumer.idle()

    def _released(self, held: Held, outcome: Outcome) -> None:
        self.released.append((held, outcome))
        self.ended.set()

    def hold(self, blocks: list[int], num_tokens: int) -> m.TransferParams:
        transfer_id = m.new_request_id()
        binding = m.Binding(consumer_engine_id="decode0")
        expires = self.producer.hold(Held(transfer_id, tuple(blocks), num_tokens, binding))
        return self.producer.sign(m.TransferParams(
            engine_id="prefill0", boot_epoch=1, request_id=transfer_id, block_ids=blocks,
            side_channel=f"tcp://127.0.0.1:{self.port}", tp_size=1, binding=binding, num_tokens=num_tokens,
            lease_s=LEASE_S, expires_unix_ms=expires))

    def close(self) -> None:
        self._stop.set()
        self._idle.join(5)
        self.consumer.close()
        self.producer.stop()
        self.decode.close()
        self.prefill.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def tokens(t: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return t[block, :, :, :n]  # HND: [blocks, 2, H, block_size, D] -> K and V of n tokens


@pytest.mark.parametrize("mode", [m.Mode.READ, m.Mode.WRITE])
def test_a_load_moves_exactly_the_requests_tokens_and_done_ends_the_lease(pair, mode):
    params = pair.hold([3, 7], 20)  # a whole block and 4 tokens of the next
    before = [t.clone() for t in pair.decode.tensors]
    loaded = pair.consumer.load(Load(params, torch.tensor([5, 9]).numpy(), 20, mode=mode,
                                     not_after_unix=time.time() + 5))
    assert loaded.summary.num_bytes >= 20 * 2 * 2 * 8 * 4 * 2  # tokens x K,V x heads x dim x fp32 x layers
    untouched = [b for b in range(16) if b not in (5, 9)]
    for src, dst, old in zip(pair.prefill.tensors, pair.decode.tensors, before, strict=True):
        assert torch.equal(tokens(dst, 5, BLOCK), tokens(src, 3, BLOCK))
        assert torch.equal(tokens(dst, 9, 4), tokens(src, 7, 4))
        assert torch.equal(dst[untouched], old[untouched])  # no other block
    assert pair.ended.wait(5) and pair.released == [(pair.released[0][0], Outcome.CONFIRMED)]
    assert pair.producer.num_held == 0


def test_a_renewed_lease_outlives_its_length_and_expires_once_renewals_stop(pair):
    params = pair.hold([1], 8)
    heartbeat = Heartbeat(pair.leases)
    try:
        heartbeat.track(params)
        assert not pair.ended.wait(3 * LEASE_S), "the lease expired although it was renewed"
        assert heartbeat.valid_until_ms(params) > params.expires_unix_ms
        heartbeat.untrack(params.request_id)
        assert pair.ended.wait(3 * LEASE_S)
        assert pair.released[0][1] is Outcome.EXPIRED
    finally:
        heartbeat.close()


class RecordingLeases(LeaseClient):
    """A real lease client that also says when a round of renewals was sent."""

    def __init__(self, clients: ClientCache) -> None:
        super().__init__(clients, timeout_s=5.0)
        self.renewed = threading.Event()
        self.rounds: list[Renewal] = []
        self.asked: list[set[str]] = []  # each round's request ids

    def renew(self, params):
        self.asked.append({p.request_id for p in params})
        renewal = super().renew(params)
        self.rounds.append(renewal)
        self.renewed.set()
        return renewal


def test_a_request_tracked_late_in_its_lease_is_renewed_at_once(pair):
    """The heartbeat renews a lease a period (lease_s / 6) after its grant: a request the consumer
    got late in its lease (a slow client, a long trip) is renewed when it is tracked, not a period
    later, when it may have expired; the others wait for their own time. Leases of 60 s here: a
    period is 10 s."""
    params = pair.hold([1], 8)
    leases = RecordingLeases(ClientCache(ClientConfig(insecure=True)))
    heartbeat = Heartbeat(leases)
    try:
        now_ms = int(time.time() * 1e3)
        late = msgspec.structs.replace(params, lease_s=60.0, expires_unix_ms=now_ms + 5_000)  # granted 55 s ago
        heartbeat.track(late)
        assert leases.renewed.wait(5.0), "a request tracked 55 s into its 60 s lease was not renewed at once"
        assert late.request_id in leases.rounds[0].expires_ms  # its producer extended it
        leases.renewed.clear()
        fresh = msgspec.structs.replace(params, request_id="a" * 32, lease_s=60.0, expires_unix_ms=now_ms + 60_000)
        heartbeat.track(fresh)
        assert not leases.renewed.wait(1.0), "a request granted just now was renewed before its period"
        # another late arrival: renewed at once, alone (a round renews only what is due)
        also_late = msgspec.structs.replace(late, request_id="b" * 32)
        heartbeat.track(also_late)
        assert leases.renewed.wait(5.0)
        assert leases.asked[-1] == {also_late.request_id}
    finally:
        heartbeat.close()
        leases.clients.close()


@pytest.mark.parametrize("mode", [m.Mode.READ, m.Mode.WRITE])
@pytest.mark.parametrize("forgery", ["block_ids", "request_id", "unsigned"])
def test_forged_parameters_are_refused_before_any_transfer(pair, mode, forgery):
    genuine = pair.hold([2, 4], 20)
    forged = {"block_ids": lambda p: msgspec.structs.replace(p, block_ids=[4, 2]),
              "request_id": lambda p: msgspec.structs.replace(p, request_id="f" * 32),
              "unsigned": lambda p: msgspec.structs.replace(p, mac="")}[forgery](genuine)
    before = [t.clone() for t in pair.decode.tensors]
    with pytest.raises(AuthError):
        pair.consumer.load(Load(forged, torch.tensor([5, 9]).numpy(), 20, mode=mode,
                                not_after_unix=time.time() + 5))
    assert all(torch.equal(a, b) for a, b in zip(before, pair.decode.tensors, strict=True))
    assert pair.producer.metrics.value("kvxfer_transfers_total", op="write") == 0
    assert pair.producer.num_held == 1  # the genuine request is untouched, still held


# ---- push requests: a NIXL notification, so its MAC is what says who sent it --------------------

def push_ask(pair: Pair, params: m.TransferParams, blocks: list[int], *, key: bytes | None = None) -> tuple[m.PushAsk, str]:
    """A push request as the consumer rank signs it (with `key` instead, a forger's), and the
    producer rank's NIXL agent it goes to."""
    link = pair.consumer.link(params, 0)
    ask = m.PushAsk(request_id=params.request_id, decode_rank=0, block_ids=blocks, decode_engine_id="decode0",
                    not_after_unix=time.time() + 5)
    return capability.sign_ask(ask, link.ask_key if key is None else key), link.peer.agent_name


def send(pair: Pair, agent: str, ask: m.PushAsk) -> None:
    """From the consumer rank's own NIXL agent: only the MAC can tell a forgery from its ask."""
    with pair.consumer.nixl_lock:
        pair.decode.agent.send_notif(agent, m.encode_notif(ask))


def push_within(pair: Pair, params: m.TransferParams, bound_s: float, *, not_after_s: float) -> None:
    """A WRITE load of `params` into blocks 5 and 9 whose outcome (its error, raised) comes within
    `bound_s`, long before the push's not-after time, `not_after_s` away: a wait that ended on a
    message or a probe, not on the deadline."""
    started = time.monotonic()
    try:
        pair.consumer.load(Load(params, torch.tensor([5, 9]).numpy(), 20, mode=m.Mode.WRITE,
                                not_after_unix=time.time() + not_after_s))
    finally:
        assert time.monotonic() - started < bound_s, "the consumer rank waited out the push's not-after time"


def until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the producer rank never got to it"
        time.sleep(0.005)


@pytest.mark.parametrize("forgery", ["another key", "altered after signing", "unsigned"])
def test_a_push_request_without_the_consumers_mac_moves_nothing(pair, forgery):
    params = pair.hold([2, 4], 20)
    ask, agent = push_ask(pair, params, [5, 9], key=b"k" * 32 if forgery == "another key" else None)
    if forgery == "altered after signing":
        ask = msgspec.structs.replace(ask, block_ids=[9, 5])
    elif forgery == "unsigned":
        ask = msgspec.structs.replace(ask, mac="")
    before = [t.clone() for t in pair.decode.tensors]
    send(pair, agent, ask)
    until(lambda: pair.producer.metrics.value("kvxfer_failures_total", kind="auth") >= 1)
    assert pair.producer.metrics.value("kvxfer_transfers_total", op="write") == 0
    assert all(torch.equal(a, b) for a, b in zip(before, pair.decode.tensors, strict=True))
    assert pair.producer.num_held == 1  # the request itself is untouched: its consumer still loads it
    pair.consumer.load(Load(params, torch.tensor([5, 9]).numpy(), 20, mode=m.Mode.WRITE,
                            not_after_unix=time.time() + 5))
    assert torch.equal(tokens(pair.decode.tensors[0], 5, BLOCK), tokens(pair.prefill.tensors[0], 2, BLOCK))


def test_a_push_request_replayed_while_its_lease_runs_moves_nothing_more(pair):
    """The same ask twice (as someone who saw it on the wire would send it): one push; the copy is
    dropped and counted, never refused to the genuine consumer (a refusal would fail its load)."""
    params = pair.hold([2, 4], 20)
    ask, agent = push_ask(pair, params, [5, 9])
    send(pair, agent, ask)
    send(pair, agent, ask)
    answers: list[m.XferNotif] = []

    def answered() -> bool:
        pair.consumer.inbox.collect()
        answers.extend(n.notif for n in pair.consumer.inbox.take(params.request_id)
                       if n.agent == agent and isinstance(n.notif, m.XferNotif) and n.notif.kind is m.NotifKind.PUSHED)
        return bool(answers) and pair.producer.metrics.value("kvxfer_failures_total", kind="auth") >= 1

    until(answered)
    assert [a.status for a in answers] == [m.Status.OK]
    assert pair.producer.metrics.value("kvxfer_transfers_total", op="write") == 1
    assert torch.equal(tokens(pair.decode.tensors[1], 9, 4), tokens(pair.prefill.tensors[1], 4, 4))


def test_a_key_cannot_handshake_as_another_consumers_engine_or_agent():
    """CURVE: the engine id, rank and NIXL agent name in a handshake are the consumer's own claims.
    Another allowed key that claims the ones a consumer handshook with is refused, so it can
    neither have that consumer's pushes land in its memory nor its own in the consumer's."""
    server, victim_key, intruder_key = generate_keypair(), generate_keypair(), generate_keypair()
    prefill = endpoint(m.Role.PREFILL, "prefill0", 1.0, TransferMetrics())
    producer = Producer(prefill, signer=Signer(master_secret(None, engine_id="prefill0", boot_epoch=1)),
                        lease_s=30.0, metrics=prefill.metrics, on_release=lambda *_: None, nixl_lock=threading.RLock())
    port = free_ports(1)
    producer.start(ServerConfig(port=port, keys=KeyConfig(own=server, allowed_client_keys=frozenset(
        {victim_key.public, intruder_key.public})), engine_id="prefill0", boot_epoch=1))

    def consumer_of(engine_id: str, agent: str, keys) -> tuple[Endpoint, Consumer]:
        end = endpoint(m.Role.DECODE, engine_id, -1.0, agent=agent)
        clients = ClientCache(ClientConfig(keys=KeyConfig(own=keys, server_public_key=server.public)))
        return end, Consumer(end, clients=clients, leases=LeaseClient(clients, timeout_s=5.0), nixl_lock=threading.RLock(),
                             identity=identity_of_peer(keys.public.decode(), engine_id), handshake_timeout_s=5.0,
                             request_timeout_s=5.0)

    binding = m.Binding(consumer_key=victim_key.public.decode(), consumer_engine_id="decode0")
    transfer_id = m.new_request_id()
    params = producer.sign(m.TransferParams(
        engine_id="prefill0", boot_epoch=1, request_id=transfer_id, block_ids=[3, 7],
        side_channel=f"tcp://127.0.0.1:{port}", tp_size=1, binding=binding, num_tokens=20, lease_s=30.0,
        expires_unix_ms=producer.hold(Held(transfer_id, (3, 7), 20, binding))))
    sides = [consumer_of("decode0", "decode0-agent", victim_key), consumer_of("decode0", "intruder-agent", intruder_key),
             consumer_of("intruder", "decode0-agent", intruder_key)]
    try:
        (victim_end, victim), *intruders = sides
        victim.link(params, 0)
        for _, intruder in intruders:
            with pytest.raises(AuthError, match="which another key handshook as before"):
                intruder.link(params, 0)
        victim.load(Load(params, torch.tensor([5, 9]).numpy(), 20, mode=m.Mode.WRITE, not_after_unix=time.time() + 5))
        assert torch.equal(tokens(victim_end.tensors[0], 5, BLOCK), tokens(prefill.tensors[0], 3, BLOCK))
    finally:
        for end, consumer in sides:
            consumer.close()
            end.close()
        producer.stop()
        prefill.close()


def test_a_wait_for_a_push_ends_soon_after_its_producer_stops_answering(pair):
    """A push request is a notification, which a stopped producer never refuses: the consumer
    rank pings it once the wait lasts (`liveness`) and gives up with PeerGoneError long before
    the push's not-after time, not at it."""
    params = pair.hold([2, 4], 20)
    pair.consumer.link(params, 0)  # handshaken: what follows is the request's own path
    pair.producer.stop()  # its side channel and its thread: no push, no answer
    with pytest.raises(PeerGoneError, match="stopped answering while its push was awaited"):
        push_within(pair, params, 30.0, not_after_s=60.0)


def test_a_refusal_reaches_a_consumer_rank_whose_agent_the_producer_had_forgotten(pair):
    """A producer forgets a consumer rank's NIXL agent after a failed push (its endpoint may be
    dead); a later refusal must still reach it, not leave it waiting out the push's deadline.
    The forgetting is done directly here: a failed push that leaves no landing is hard to cause."""
    params = pair.hold([2, 4], 20)
    pair.consumer.link(params, 0)
    until(lambda: pair.producer.endpoint.peers.get("decode0", 0) is not None)  # its pushes were prepared
    with pair.producer_lock:
        pair.producer.endpoint.peers.forget("decode0", 0)
    assert pair.producer.drop(params.request_id, "the test ends it")
    with pytest.raises(LeaseError, match="its lease on rank 0 has ended"):
        push_within(pair, params, 5.0, not_after_s=60.0)


def test_a_push_asked_for_too_late_is_refused_and_writes_nothing(pair):
    """A producer rank that gets to an ask after the consumer's not-after time (it was stalled)
    refuses it, saying why, instead of writing into memory the consumer may have reused."""
    params = pair.hold([2, 4], 20)
    ask, agent = push_ask(pair, params, [5, 9])
    ask = capability.sign_ask(msgspec.structs.replace(ask, not_after_unix=time.time() - 1.0),
                              pair.consumer.link(params, 0).ask_key)
    before = [t.clone() for t in pair.decode.tensors]
    send(pair, agent, ask)
    with pytest.raises(TransferTimeout, match="refusing to write into memory it may have reused"):
        pair.consumer.inbox.wait(params.request_id, m.NotifKind.PUSHED, {0: agent}, timeout_s=10.0,
                                 what=lambda ranks: f"push {ranks}")
    assert pair.producer.metrics.value("kvxfer_transfers_total", op="write") == 0
    assert all(torch.equal(a, b) for a, b in zip(before, pair.decode.tensors, strict=True))
