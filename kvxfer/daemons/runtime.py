"""One rank of a service: its engine shard, its transfer endpoint, its side-channel server, and
the commands rank 0 sends it.

Rank 0 and ranks 1..N-1 run the same `RankRuntime`; rank 0 calls `execute` directly, the others
through the command bus (`bus.py`, `worker.py`). Commands are collective where the engine is
(prefill, decode) and per rank where transfers are (each rank handshakes with and moves bytes to
or from exactly the peers the TP mapping gives it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from kvxfer.agents import messages as m
from kvxfer.agents.compat import check_compatible
from kvxfer.agents.endpoint import DeadlinePolicy, Endpoint, Identity, Leg, TransferSummary
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.nixl_agent import AgentConfig, Threading
from kvxfer.agents.peers import Peer
from kvxfer.agents.sidechannel import (
    ClientConfig,
    PeerInfo,
    ServerConfig,
    SideChannelClient,
    SideChannelServer,
)
from kvxfer.agents.staged_transfer import Reservation, release_later
from kvxfer.daemons.commands import (
    AwaitPush,
    Command,
    Connect,
    Decode,
    Describe,
    Described,
    Moved,
    Ok,
    Prefill,
    Pull,
    Push,
    Reply,
    Reserve,
    Reserved,
    Token,
    Unreserve,
)
from kvxfer.daemons.config import Role, load_curve_keys
from kvxfer.daemons.rank_setup import (
    ClientCache,
    RankSetup,
    collective_backend,
    engine_config,
    model_fingerprint,
    side_channel_address,
    staging_config,
)
from kvxfer.engine.engine import DecodeRequest, Engine
from kvxfer.engine.parallel import TPGroup
from kvxfer.engine.sampling import SamplingParams
from kvxfer.errors import (
    AuthError,
    ConfigError,
    HandshakeError,
    KvxferError,
    PeerGoneError,
    PlanError,
    TransferTimeout,
)
from kvxfer.planning import Fallback, map_tp
from kvxfer.planning.cost import FabricCosts

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
_INBOX_TTL_S = 300.0


class RankRuntime:
    def __init__(self, setup: RankSetup, *, metrics: TransferMetrics | None = None) -> None:
        config = self.config = setup.config
        self.rank = setup.rank
        self.metrics = metrics or TransferMetrics()
        self.keys = load_curve_keys(config.curve) if config.curve is not None else None
        self.engine_config = engine_config(config)
        group = TPGroup.init(rank=setup.rank, size=config.tp, init_method=setup.dist_init,
                             backend=collective_backend(config)) if config.tp > 1 else TPGroup.single()
        self.engine = Engine(self.engine_config, group)
        identity = Identity(engine_id=config.engine_id, boot_epoch=setup.boot_epoch,
                            role=m.Role(config.role.value), tp_size=config.tp, tp_rank=setup.rank,
                            model_fingerprint=model_fingerprint(self.engine_config))
        agent = AgentConfig(name=f"{config.engine_id}-{setup.boot_epoch}-r{setup.rank}",
                            threading=Threading.PROGRESS_THREAD if config.nixl_threads else Threading.APP_POLL)
        staging = staging_config(config, max_tokens=self.engine.model_config.max_position)
        self.endpoint = Endpoint(identity, self.engine.caches, self.engine.cache_desc, agent_config=agent,
                                 fallback=Fallback.FINE,
                                 deadline=DeadlinePolicy(config.transfer_deadline_s, config.expected_gbps),
                                 metrics=self.metrics, staging=staging)
        self.costs: dict[tuple[str, int], FabricCosts] = {}  # rank 0: per producer (engine, epoch)
        self._peer_keys: dict[tuple[str, int], str | None] = {}  # prefill: who handshook as (engine, rank)
        self._reservations: dict[str, Reservation] = {}
        self.lock = threading.RLock()  # the NIXL agent and peer table: command thread vs server thread
        self.info = self.endpoint.info()
        self._clients = ClientCache(ClientConfig(keys=self.keys, insecure=config.insecure_plaintext))
        self._inbox: dict[str, tuple[float, set[int]]] = {}  # request id -> (first seen, sender ranks)
        self.server: SideChannelServer | None = None
        # Rank 0's service answers lease and push messages; set before the server starts.
        self.service_handler: Callable[[PeerInfo, m.Message], m.Message | None] | None = None
        if config.role is Role.PREFILL:
            self.server = SideChannelServer(ServerConfig(
                host=config.side_channel_host, port=config.side_channel_port + setup.rank, keys=self.keys,
                insecure=config.insecure_plaintext, engine_id=config.engine_id,
                boot_epoch=setup.boot_epoch), self.handle_peer)
            self.server.start()
        if config.warmup:
            self.engine.warmup()

    @property
    def advertised_side_channel(self) -> str:
        return f"tcp://{self.config.advertise_host}:{self.config.side_channel_port + self.rank}"

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self._clients.close()
        with self.lock:
            self.endpoint.close()
        self.engine.group.close()

    # ---- side channel (prefill ranks): handshakes from decode ranks --------------------------

    def handle_peer(self, peer: PeerInfo, msg: m.Message) -> m.Message:
        """Per-rank side-channel messages. Rank 0's service wraps this for leases and pushes."""
        if isinstance(msg, m.HandshakeRequest):
            check_compatible(m.HandshakeReply(engine=self.info), msg, peer=msg.engine.engine_id)
            with self.lock:
                self.endpoint.peers.admit(msg.engine)
                self._peer_keys[msg.engine.engine_id, msg.engine.tp_rank] = peer.public_key
            return m.HandshakeReply(engine=self.info)
        if self.service_handler is not None:
            reply = self.service_handler(peer, msg)
            if reply is not None:
                return reply
        return m.ErrorReply(kind="malformed", message=f"rank {self.rank} does not take {type(msg).__name__}")

    # ---- commands -----------------------------------------------------------------------------

    def execute(self, command: Command) -> Reply:
        match command:
            case Prefill():
                ids = self.engine.shape_block_ids(command.block_ids)
                out = self.engine.prefill(command.token_ids, ids, sampling=_sampling(command))
                return Token(out.tokens[0])
            case Decode():
                ids = self.engine.shape_block_ids(command.block_ids)
                out = self.engine.decode([DecodeRequest(token_id=command.token_id, block_ids=ids,
                                                        num_cached=command.num_cached,
                                                        sampling=_sampling(command))])
                return Token(out.tokens[0])
            case Connect():
                self.connect(command.params)
                return Ok()
            case Pull():
                return _moved(self.pull(command.params, command.block_ids))
            case AwaitPush():
                started = time.perf_counter()
                self.await_push(command.params, command.timeout_s)
                if command.staged:
                    self.scatter(command.params.request_id)
                return Moved(num_bytes=self.expected_bytes(command.params),
                             num_descriptors=len(self._sources(command.params)) if command.staged else 0,
                             seconds=time.perf_counter() - started)
            case Reserve():
                return Reserved(self.reserve(command.params, command.block_ids))
            case Unreserve():
                self.unreserve(command.request_id, command.delay_s)
                return Ok()
            case Push():
                if not self.pairs_with(command.decode_rank, command.decode_tp):
                    return Moved()
                self._check_requester(command)
                self._check_in_time(command)
                if command.staging_offsets is not None:
                    return _moved(self.push_staged(command))
                return _moved(self.push(command))
            case Describe():
                import os

                return Described(self.info, self.advertised_side_channel, os.getpid())
        raise HandshakeError(f"unknown command {type(command).__name__}")

    def idle(self) -> None:
        """Between commands: drive NIXL and file notifications by request."""
        with self.lock:
            notifs = self.endpoint.collect_notifs()
        now = time.monotonic()
        for notif in notifs:
            first, senders = self._inbox.setdefault(notif.request_id, (now, set()))
            senders.add(notif.rank)
        for rid in [r for r, (t, _) in self._inbox.items() if now - t > _INBOX_TTL_S]:
            del self._inbox[rid]

    # ---- decode side --------------------------------------------------------------------------

    def _sources(self, params: m.TransferParams):
        mapping = map_tp(self.engine.model_config.num_kv_heads, params.tp_size, self.config.tp)
        return mapping.sources_of(self.rank)

    def _legs(self, params: m.TransferParams) -> list[Leg]:
        """This rank's share of a request: one leg per prefill rank it reads from (handshaking
        with any it has not met at this epoch)."""
        remote_ids = self.engine.shape_block_ids(params.block_ids)
        return [Leg(self._peer(params, s.prefill_rank), s.heads, remote_ids) for s in self._sources(params)]

    def connect(self, params: m.TransferParams) -> None:
        """Handshake with every prefill rank we read from, unless already done at this epoch.
        Rank 0 then calibrates the cost model against the first of them, once per epoch."""
        peers = [leg.peer for leg in self._legs(params)]
        key = (params.engine_id, params.boot_epoch)
        if self.rank != 0 or key in self.costs or not peers:
            return
        try:
            with self.lock:
                costs = self.endpoint.calibrate(peers[0])
        except KvxferError as err:  # the rule-based choice still works; say why it is used
            log.warning("calibration against %s failed, choosing transfers by rule: %s", params.engine_id, err)
            return
        if costs is not None:
            self.costs = {k: v for k, v in self.costs.items() if k[0] != params.engine_id}  # old epochs
            self.costs[key] = costs

    def direct_descriptors(self, params: m.TransferParams) -> int:
        """Descriptors a direct transfer of the request posts, all decode ranks (they are alike)."""
        per_layer = sum(self.endpoint.peers.plan(leg.peer, leg.heads).units_per_layer(params.num_tokens)
                        for leg in self._legs(params))
        return per_layer * self.engine.cache_desc.num_layers * self.config.tp

    def can_stage(self, params: m.TransferParams) -> bool:
        """Both sides have staging slots and this rank's share fits one."""
        area = self.endpoint.staging
        if area is None or area.pool is None:
            return False
        return (all(leg.peer.info.staging is not None and leg.peer.info.staging.slots_bytes
                    for leg in self._legs(params))
                and self.expected_bytes(params) <= area.pool.slot_bytes)

    def reserve(self, params: m.TransferParams, block_ids: list[int]) -> list[int]:
        legs = self._legs(params)
        with self.lock:
            parts = self.endpoint.staged_parts(legs, self.prompt_blocks(block_ids, params.num_tokens),
                                               params.num_tokens)
        # Wait for a slot without the lock: handshakes on the side channel go on meanwhile.
        reservation = self.endpoint.reserve(parts) if parts is not None else None
        if reservation is None:
            return []
        self._reservations[params.request_id] = reservation
        return reservation.wire_offsets()

    def scatter(self, request_id: str) -> None:
        reservation = self._reservations.pop(request_id, None)
        if reservation is None:
            raise ConfigError(f"request {request_id}: no staging slot reserved on decode rank {self.rank}")
        try:
            reservation.scatter()
        finally:
            self.endpoint.staging.pool.release(reservation.slot)

    def unreserve(self, request_id: str, delay_s: float) -> None:
        reservation = self._reservations.pop(request_id, None)
        if reservation is not None:
            release_later(self.endpoint.staging, reservation, delay_s)

    def _peer(self, params: m.TransferParams, prefill_rank: int):
        with self.lock:
            peer = self.endpoint.peers.get(params.engine_id, prefill_rank)
        if peer is not None and peer.boot_epoch == params.boot_epoch:
            return peer
        address = side_channel_address(params.side_channel, prefill_rank)
        client = self.client_for(address)
        reply = client.request(m.HandshakeRequest(engine=self.info), timeout_s=HANDSHAKE_TIMEOUT_S)
        if not isinstance(reply, m.HandshakeReply):
            raise HandshakeError(f"{address} answered {type(reply).__name__} to a handshake")
        remote = reply.engine
        check_compatible(m.HandshakeRequest(engine=self.info), reply, peer=address)
        if remote.engine_id != params.engine_id or remote.boot_epoch != params.boot_epoch:
            raise PeerGoneError(
                f"prefill {params.engine_id} rank {prefill_rank} at epoch {params.boot_epoch} is gone: "
                f"{address} is now {remote.engine_id} at epoch {remote.boot_epoch} (restarted; its KV is lost)")
        with self.lock:
            return self.endpoint.peers.admit(remote)

    def push_timeout(self, num_tokens: int) -> float:
        desc = self.engine.cache_desc
        per_token = desc.num_kv * desc.num_heads * desc.row_bytes * desc.num_layers
        return self.endpoint.deadline.seconds(per_token * num_tokens)

    def client_for(self, address: str) -> SideChannelClient:
        return self._clients.get(address)

    def pull(self, params: m.TransferParams, block_ids: list[int]) -> TransferSummary:
        legs = self._legs(params)
        with self.lock:
            return self.endpoint.read(params.request_id, legs, self.prompt_blocks(block_ids, params.num_tokens),
                                      params.num_tokens)

    def prompt_blocks(self, block_ids: list[int], num_tokens: int):
        """The blocks of a request's first `num_tokens` tokens, shaped for the layout."""
        shaped = np.asarray(self.engine.shape_block_ids(block_ids))
        pages = -(-num_tokens // self.engine.block_size)
        return shaped[..., :pages]

    def expected_bytes(self, params: m.TransferParams) -> int:
        """Bytes of the request's tokens this rank receives (every head it reads)."""
        desc = self.engine.cache_desc
        heads = sum(s.heads.size for s in self._sources(params))
        return heads * desc.row_bytes * desc.num_kv * desc.num_layers * params.num_tokens

    def await_push(self, params: m.TransferParams, timeout_s: float) -> None:
        expected = {s.prefill_rank for s in self._sources(params)}
        deadline = time.monotonic() + timeout_s
        while True:
            self.idle()
            got = self._inbox.get(params.request_id, (0.0, set()))[1]
            if expected <= got:
                self._inbox.pop(params.request_id, None)
                return
            if time.monotonic() > deadline:
                raise TransferTimeout(f"request {params.request_id}: pushes from prefill ranks "
                                      f"{sorted(expected - got)} not done after {timeout_s:.1f} s")
            time.sleep(0.0005)

    # ---- prefill side -------------------------------------------------------------------------

    def _consumer(self, command: Push) -> Peer:
        with self.lock:
            peer = self.endpoint.peers.get(command.decode_engine_id, command.decode_rank)
        if peer is None:
            raise HandshakeError(f"decode {command.decode_engine_id} rank {command.decode_rank} never "
                                 f"handshook with prefill rank {self.rank}")
        return peer

    def push(self, command: Push) -> TransferSummary:
        peer = self._consumer(command)
        with self.lock:
            mapping = map_tp(self.engine.model_config.num_kv_heads, self.config.tp, peer.info.tp_size)
            heads = [a.heads for a in mapping.targets_of(self.rank) if a.decode_rank == command.decode_rank]
            pages = -(-command.num_tokens // peer.region.desc.block_size)
            decode_ids = np.asarray(command.decode_block_ids)
            decode_ids = decode_ids.reshape(2, -1)[:, :pages] if peer.region.desc.separate_kv_pages \
                else decode_ids[:pages]
            legs = [Leg(peer, h, decode_ids) for h in heads]
            return self.endpoint.write(command.request_id, legs, self.engine.shape_block_ids(command.block_ids),
                                       command.num_tokens)

    def push_staged(self, command: Push) -> TransferSummary:
        """Gather each of our parts for decode rank `decode_rank`, one WRITE each into the slot
        offsets it reserved (validated against its registered slots area on the way)."""
        peer = self._consumer(command)
        mapping = map_tp(self.engine.model_config.num_kv_heads, self.config.tp, command.decode_tp)
        sources = mapping.sources_of(command.decode_rank)
        if len(command.staging_offsets) != len(sources):
            raise PlanError(f"staged push: {len(command.staging_offsets)} staging offsets for decode rank "
                            f"{command.decode_rank}, which has {len(sources)} sources")
        local = self.prompt_blocks(command.block_ids, command.num_tokens)
        total = TransferSummary(m.Mode.WRITE)
        for source, offset in zip(sources, command.staging_offsets, strict=True):
            if source.prefill_rank != self.rank:
                continue
            with self.lock:
                done = self.endpoint.write_staged(command.request_id, Leg(peer, source.heads, local), local,
                                                  command.num_tokens, offset)
            total.num_bytes += done.num_bytes
            total.num_descriptors += done.num_descriptors
            total.seconds += done.seconds
        return total

    def _check_in_time(self, command: Push) -> None:
        late = time.time() - command.not_after_unix if command.not_after_unix is not None else 0.0
        if late > 0:
            raise TransferTimeout(f"push of {command.request_id[:8]} to decode rank {command.decode_rank}: the "
                                  f"consumer stopped waiting {late:.3f} s ago; refusing to write into memory it "
                                  "may have reused")

    def _check_requester(self, command: Push) -> None:
        if command.requester_key is None:
            return  # --insecure-plaintext: no authenticated identity to compare (docs/security.md)
        with self.lock:
            key = self._peer_keys.get((command.decode_engine_id, command.decode_rank))
        if key != command.requester_key:
            raise AuthError(f"push of {command.request_id[:8]}: decode {command.decode_engine_id} rank "
                            f"{command.decode_rank} did not handshake with the key that asked for it; refusing")

    def pairs_with(self, decode_rank: int, decode_tp: int) -> bool:
        mapping = map_tp(self.engine.model_config.num_kv_heads, self.config.tp, decode_tp)
        return any(a.decode_rank == decode_rank for a in mapping.targets_of(self.rank))


def _sampling(command: Prefill | Decode) -> SamplingParams:
    return SamplingParams(temperature=command.temperature, seed=command.seed)


def _moved(summary: TransferSummary) -> Moved:
    return Moved(summary.num_bytes, summary.num_descriptors, summary.seconds)

