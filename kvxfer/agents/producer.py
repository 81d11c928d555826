"""The producer role of the transfer protocol: one per producer (prefill) rank, driven alike by
the daemons' prefill ranks and the vLLM connector's producer workers.

A producer rank holds each finished request under a lease bound to one consumer (`hold`), and
the lease ends exactly once:
- confirmed: every consumer rank sent a `DONE` notification (after its own transfers finished),
- aborted: the consumer sent `Abort` (it failed, or needs nothing more),
- expired: the consumer stopped renewing (`LeaseRenew`, its heartbeat) for `lease_s`.
The driver learns of each end through `on_release` (the daemons free the blocks on rank 0; vLLM
reports the request as finished sending). In WRITE mode a consumer rank asks this rank for a push
with a NIXL notification (`PushAsk`, under a MAC of the consumer's own key: NIXL does not
authenticate who sent it); the push never waits behind the driver's compute, and its notification
(`PUSHED`) tells the consumer rank when the bytes landed or why they did not. Each consumer rank
gets one push per request: an ask replayed is dropped.

Threads: the side-channel server's thread runs `handle` (handshakes, renewals, aborts). This
role's thread runs `poll`: notifications (confirmations, push requests) and the pushes they ask
for, at once (a direct push still running after `INLINE_PUSH_S` is finished by later polls, so
one slow consumer holds up no other), leases' expiry. For `ASK_WINDOW_S` after each `hold`, while
a lease is held, it polls every `_IDLE_FIRST_S` (where a consumer that may push handshook): a
push request is then on its way. The driver's thread calls `hold`. `_lock` guards the state they
share; the NIXL lock is the driver's, shared with anything else using the agent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from kvxfer.agents import messages as m
from kvxfer.agents.capability import Signer, ask_key, check_ask, identity_of_peer
from kvxfer.agents.compat import check_compatible
from kvxfer.agents.endpoint import Endpoint, Leg, Posted, shaped_ids
from kvxfer.agents.inbox import Inbox, Notice
from kvxfer.agents.landings import Landings
from kvxfer.agents.leases import LeaseTable, Outcome, Released
from kvxfer.agents.limited_log import LimitedLog
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.nixl_agent import Op
from kvxfer.agents.pacing import IdlePacer
from kvxfer.agents.peers import Peer
from kvxfer.agents.sidechannel import PeerInfo, ServerConfig, SideChannelServer, check_binding
from kvxfer.agents.staged_transfer import Staged
from kvxfer.agents.wiring import wire_connection
from kvxfer.errors import (
    AllocationError,
    AuthError,
    KvxferError,
    LeaseError,
    PlanError,
    TransferError,
    TransferTimeout,
)
from kvxfer.planning import HeadRange, map_tp

log = logging.getLogger(__name__)

CONSUMER = "consumer"  # a lease's one logical consumer; its ranks are tallied in `_Lease`
EARLY_TTL_S = 60.0  # notifications and push requests that beat their `hold` wait this long
EARLY_MAX = 4096  # for at most this many requests
EARLY_PER_REQUEST = 256  # and at most this many notifications each (its consumer ranks' asks and DONEs)
ENDED_MAX = 4096  # leases remembered after their end: a late push request is refused, not filed
WIRE_TIMEOUT_S = 1.0  # the probe READ wiring a new consumer's connection (this thread's pushes wait)
INLINE_PUSH_S = 2e-3  # a direct push this thread posted: it waits this long, then polls it later
ASK_WINDOW_S = 0.1  # after a hold, this thread polls at its fastest while the lease waits for its ask
# Idle polling: between requests confirmations wait at most 10 ms; every producer rank of a host
# polls, so not much more often.
_IDLE_FIRST_S, _IDLE_LONGEST_S = 20e-6, 10e-3
_NO_IDS = np.empty(0, dtype=np.int64)  # legs that only name a peer's heads


@dataclass(frozen=True)
class Held:
    """One request as a producer rank holds it."""

    transfer_id: str
    block_ids: tuple[int, ...]  # the request's blocks (allocator ids), in token order
    num_tokens: int
    binding: m.Binding
    tag: object = None  # the driver's own handle of the request (vLLM's request id)


Release = Callable[[Held, Outcome], None]


@dataclass
class _Lease:
    held: Held
    confirmed: set[int] = field(default_factory=set)  # consumer ranks that sent DONE
    asked: set[tuple[str, int]] = field(default_factory=set)  # (identity, rank) whose push was admitted


@dataclass(frozen=True)
class _ConsumerRank:
    """A consumer rank as its handshake (authenticated by CURVE) described it."""

    info: m.EngineInfo
    peer: PeerInfo
    identity: str
    targets: tuple[HeadRange, ...]  # the heads this producer rank pushes to it (map_tp, once)
    ask_key: bytes  # what its push requests are signed with (`capability.ask_key`)


@dataclass(frozen=True)
class _Push:
    held: Held
    ask: m.PushAsk
    consumer: _ConsumerRank


class Producer:
    def __init__(self, endpoint: Endpoint, *, signer: Signer, lease_s: float, metrics: TransferMetrics,
                 on_release: Release, nixl_lock: threading.RLock, shared_blocks: bool = False,
                 grant_unbound: bool = False) -> None:
        self.endpoint = endpoint
        self.rank = endpoint.identity.tp_rank
        self.tp_size = endpoint.identity.tp_size
        self.signer = signer
        self.info = endpoint.info()  # precomputed: the server thread never calls NIXL
        self.metrics = metrics
        self._leases = LeaseTable(ttl_s=lease_s, metrics=metrics)
        self._on_release = on_release
        # vLLM's prefix cache shares blocks between requests: leases then hold none exclusively.
        self._shared_blocks = shared_blocks
        # Unbound requests (no consumer named) are usable by any admitted consumer that holds
        # their parameters: without CURVE always; with it only where the server admits any key.
        self._grant_unbound = grant_unbound
        self._nixl_lock = nixl_lock
        # NIXL's CUDA transports copy in the calling thread's CUDA context: a thread makes the
        # cache's device current before its first push (`_device_current`).
        self._device = endpoint.tensors[0].device
        self._current = threading.local()
        self._inbox = Inbox(endpoint.agent, lock=nixl_lock, metrics=metrics)
        self._lock = threading.Lock()
        self._held: dict[str, _Lease] = {}
        self._consumers: dict[str, _ConsumerRank] = {}  # NIXL agent name -> consumer rank
        self._claims: dict[tuple[str, int], str] = {}  # (engine id, rank) -> the identity that handshook as it
        self._early: dict[str, tuple[float, list[Notice]]] = {}  # notifications that beat their `hold`
        self._ended: OrderedDict[str, Outcome] = OrderedDict()  # transfer id -> how its lease ended
        self._pushes: deque[_Push] = deque()  # admitted, for this role's thread to run
        self._finishing: list[tuple[_Push, Posted]] = []  # posted, still running
        self._to_prepare: deque[_ConsumerRank] = deque()  # consumer ranks that just handshook
        self._pace = IdlePacer(_IDLE_FIRST_S, _IDLE_LONGEST_S)
        self._recent: deque[tuple[float, str]] = deque()  # (monotonic, transfer id) of holds within ASK_WINDOW_S
        self._replay: deque[Notice] = deque()  # notifications that beat their `hold`, for this thread
        self._pushes_asked_for = False  # a consumer rank that may ask for pushes handshook
        self._landings: Landings[tuple[str, int]] = Landings()  # pushes given up, by transfer id
        self._bad_asks = LimitedLog(log)  # push requests whose sender cannot be trusted
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: SideChannelServer | None = None

    @property
    def lease_s(self) -> float:
        return self._leases.ttl_s

    @property
    def num_held(self) -> int:
        with self._lock:
            return len(self._held)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, server: ServerConfig) -> None:
        """Listen on the side channel and start this role's thread."""
        self._thread = threading.Thread(target=self._run, name=f"kvxfer-producer-r{self.rank}", daemon=True)
        self._thread.start()
        self._server = SideChannelServer(server, self.handle)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._stop.set()
        self._pace.wake()
        if self._thread is not None:
            self._thread.join(10)

    def _device_current(self) -> None:
        """The cache's device current in this (the role's) thread, which pushes: NIXL's CUDA
        transports copy in the calling thread's context."""
        if self._device.type == "cuda" and not getattr(self._current, "set", False):
            torch.cuda.set_device(self._device)
            self._current.set = True

    # -- the driver's thread ------------------------------------------------------------------------

    def hold(self, held: Held) -> int:
        """Start the lease of a finished request; returns when it ends unless renewed (unix ms)."""
        with self._lock:
            owned = () if self._shared_blocks else held.block_ids
            self._leases.acquire(held.transfer_id, owned, [CONSUMER], now=time.monotonic())
            self._held[held.transfer_id] = _Lease(held)
            self._replay.extend(self._early.pop(held.transfer_id, (0.0, []))[1])
            self._recent.append((time.monotonic(), held.transfer_id))
        self._pace.wake()
        log.debug("rank %d holds %s (%d blocks) for %.0f s", self.rank, held.transfer_id[:8],
                  len(held.block_ids), self.lease_s)
        return int((time.time() + self.lease_s) * 1e3)

    def drop(self, transfer_id: str, why: str) -> bool:
        """End a lease now on the driver's own account (the request failed before anyone was
        told of it). False if none was held."""
        with self._lock:
            if transfer_id not in self._held:
                return False
            released = self._end_locked(self._leases.abort(transfer_id))
        log.info("lease of %s dropped on rank %d: %s", transfer_id[:8], self.rank, why)
        self._released(released)
        return True

    def sign(self, params: m.TransferParams) -> m.TransferParams:
        return self.signer.sign(params)

    # -- the side channel's thread ------------------------------------------------------------------

    def handle(self, peer: PeerInfo, msg: m.Message) -> m.Message:
        match msg:
            case m.HandshakeRequest():
                return self._handshake(peer, msg)
            case m.Abort():
                self._abort(peer, msg)
                return m.Ack(request_id=msg.request_id)
            case m.LeaseRenew():
                return self._renew(peer, msg)
        return m.ErrorReply(kind="malformed", message=f"a producer rank does not take {type(msg).__name__}")

    def _handshake(self, peer: PeerInfo, msg: m.HandshakeRequest) -> m.Message:
        reply = m.HandshakeReply(engine=self.info)
        check_compatible(reply, msg, peer=f"{msg.engine.engine_id}/{msg.engine.tp_rank}")
        identity = identity_of_peer(peer.public_key, msg.engine.engine_id)
        consumer = _ConsumerRank(msg.engine, peer, identity, self._targets(msg.engine.tp_size, msg.engine.tp_rank),
                                 ask_key(self.signer.key_for(identity)))
        with self._lock:
            self._check_claims_locked(consumer)
            self._consumers[msg.engine.agent_name] = consumer
            self._claims[msg.engine.engine_id, msg.engine.tp_rank] = identity
            if m.Mode.WRITE in msg.engine.modes:
                self._to_prepare.append(consumer)
                self._pushes_asked_for = True
        self._pace.wake()
        unbound = self.signer.key_for("") if peer.public_key is None or self._grant_unbound else b""
        return m.HandshakeReply(engine=self.info, params_key=self.signer.key_for(identity),
                                unbound_params_key=unbound)

    def _check_claims_locked(self, consumer: _ConsumerRank) -> None:
        """A consumer rank's engine id, rank and NIXL agent name are its own claims: refuse any
        already claimed by another identity (key), so that an allowed key cannot pass for another
        consumer and have that consumer's pushes land in its memory, or its own in the other's.
        The first identity to claim a name keeps it until this producer restarts."""
        info = consumer.info
        claimed = self._claims.get((info.engine_id, info.tp_rank))
        known = self._consumers.get(info.agent_name)
        for other, what in ((claimed, f"engine {info.engine_id} rank {info.tp_rank}"),
                            (known.identity if known else None, f"NIXL agent {info.agent_name!r}")):
            if other is not None and other != consumer.identity:
                raise AuthError(f"a consumer handshook as {what}, which another key handshook as before; "
                                f"refusing (each engine id, rank and agent name belongs to one key)")

    def _abort(self, peer: PeerInfo, msg: m.Abort) -> None:
        with self._lock:
            lease = self._held.get(msg.request_id)
            if lease is None:
                return  # already ended: aborts are idempotent
            self._check_binding(peer, lease.held.binding)
            released = self._end_locked(self._leases.abort(msg.request_id))
        log.info("lease of %s ends early on rank %d: %s%s", msg.request_id[:8], self.rank,
                 f"{msg.error_kind}: " if msg.error_kind else "", msg.reason or "consumer aborted")
        self._released(released)

    def _renew(self, peer: PeerInfo, msg: m.LeaseRenew) -> m.Message:
        renewed, unknown = [], []
        now = time.monotonic()
        with self._lock:
            for transfer_id in msg.request_ids:
                lease = self._held.get(transfer_id)
                try:
                    if lease is None:
                        raise LeaseError(f"request {transfer_id}: not held")
                    self._check_binding(peer, lease.held.binding)
                    self._leases.renew(transfer_id, CONSUMER, now=now)
                    renewed.append(transfer_id)
                except KvxferError:
                    unknown.append(transfer_id)
        return m.LeaseRenewed(renewed=renewed, unknown=tuple(unknown),
                              expires_unix_ms=int((time.time() + self.lease_s) * 1e3))

    # -- push requests (this role's thread; `hold` for those that came before it) ---------------

    def _noticed(self, notice: Notice) -> None:
        """One notification: a confirmation, or a push request (a direct push runs now, a staged
        one with the others of this poll)."""
        if isinstance(notice.notif, m.PushAsk):
            push = self._asked(notice.agent, notice.notif)
            if push is None:
                return
            if push.ask.staging_offsets is None:
                self._push(push)
            else:
                with self._lock:
                    self._pushes.append(push)
        elif notice.notif.kind is m.NotifKind.DONE:
            self._released(self._confirm(notice.agent, notice.notif))

    def _asked(self, agent: str, ask: m.PushAsk) -> _Push | None:
        """Admit a push request from a trusted sender (`_trusted`), or refuse it, telling the
        consumer rank why with a `PUSHED` error."""
        consumer = self._trusted(agent, ask)
        if consumer is None:
            return None
        try:
            with self._lock:
                lease = self._held.get(ask.request_id)
                if lease is None:
                    ended = self._ended.get(ask.request_id)
                    if ended is not None:
                        raise LeaseError(f"push of {ask.request_id[:8]}: its lease on rank {self.rank} has "
                                         f"ended ({ended.value}); its blocks may hold other data now")
                    if not self._file_early(ask.request_id, Notice(agent, ask)):
                        raise AllocationError(f"push of {ask.request_id[:8]}: not held on rank {self.rank} yet, "
                                              f"and {EARLY_MAX} other requests wait for their hold; refusing")
                    return None
                return self._admit_push_locked(consumer, ask, lease)
        except KvxferError as err:
            log.warning("push of %s to %s rank %d refused: %s", ask.request_id[:8], ask.decode_engine_id,
                        ask.decode_rank, err)
            self.metrics.observe_failure(err.kind)
            self._notify(consumer, ask.request_id, err)
            return None

    def _trusted(self, agent: str, ask: m.PushAsk) -> _ConsumerRank | None:
        """The consumer rank that sent `ask`, or None: an ask from an agent no consumer handshook
        with, whose MAC fails, or a copy of one already admitted (a replay) is dropped with a
        warning and counted, never answered: its sender cannot be trusted to be who it names, and
        a refusal of a replay would fail the genuine load."""
        with self._lock:
            consumer = self._consumers.get(agent)
            lease = self._held.get(ask.request_id)
        try:
            if consumer is None:
                raise AuthError(f"push request for {ask.request_id[:8]} from NIXL agent {agent!r}, which no "
                                f"consumer rank handshook with; dropping it")
            check_ask(ask, consumer.ask_key)
            if lease is not None and (consumer.identity, ask.decode_rank) in lease.asked:
                raise AuthError(f"push of {ask.request_id[:8]} to decode rank {ask.decode_rank} was asked for "
                                f"before; dropping the copy (a replay)")
        except AuthError as err:
            self._bad_asks.warning("rank %d: %s", self.rank, err)
            self.metrics.observe_failure(err.kind)
            return None
        return consumer

    def _admit_push_locked(self, consumer: _ConsumerRank, ask: m.PushAsk, lease: _Lease) -> _Push:
        """Refuse a push the asking consumer rank may not aim where it aims, or that comes too
        late; else record that this rank asked (a copy is then a replay)."""
        info = consumer.info
        if (ask.decode_engine_id, ask.decode_rank) != (info.engine_id, info.tp_rank):
            raise AuthError(f"push of {ask.request_id[:8]}: decode {info.engine_id} rank {info.tp_rank} asked for "
                            f"a push to decode {ask.decode_engine_id} rank {ask.decode_rank}; refusing")
        self._check_binding(consumer.peer, lease.held.binding, engine_id=info.engine_id)
        _check_in_time(ask)
        if not consumer.targets:
            raise PlanError(f"push of {ask.request_id[:8]}: producer rank {self.rank} holds none of the heads "
                            f"of decode rank {ask.decode_rank} (decode TP {info.tp_size})")
        lease.asked.add((consumer.identity, ask.decode_rank))
        return _Push(lease.held, ask, consumer)

    # -- this role's thread -------------------------------------------------------------------------

    def _run(self) -> None:
        self._device_current()  # pushes gather on the cache's device
        while not self._stop.is_set():
            try:
                busy = self.poll()
            except Exception:  # the thread must outlive any bug in one step
                log.exception("producer rank %d: poll failed", self.rank)
                busy = False
            self._pace.after(busy or self._awaiting_ask())
            if not busy:
                self._pace.sleep()

    def _awaiting_ask(self) -> bool:
        """A lease granted within ASK_WINDOW_S is still held and nobody asked for its push yet,
        and a consumer rank that may ask for pushes handshook: an ask may be on its way, so poll at
        the fastest. (A READ's lease ends at its confirmation, a few milliseconds in; READ-only
        consumers never hold the pace up.)"""
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > ASK_WINDOW_S:
                self._recent.popleft()
            if not self._pushes_asked_for:
                return False
            leases = (self._held.get(transfer_id) for _, transfer_id in self._recent)
            return any(lease is not None and not lease.asked for lease in leases)

    def poll(self) -> bool:
        """Drive NIXL, apply confirmations, run queued pushes, expire leases. True if it did work."""
        finishing = self._finish_pushes()
        arrived = self._inbox.collect()
        with self._lock:
            replayed, self._replay = list(self._replay), deque()
        for notice in replayed + self._inbox.take_all():
            self._noticed(notice)
        with self._lock:
            pushes, self._pushes = list(self._pushes), deque()
            prepare = self._to_prepare.popleft() if self._to_prepare else None
            expired = [self._end_locked(r) for r in self._leases.expire(time.monotonic())]
            self._forget_early_locked()
        if prepare is not None:
            self._prepare(prepare)
        for held in expired:
            log.warning("lease of %s expired on rank %d before every consumer rank confirmed",
                        held[0].transfer_id[:8], self.rank)
            self._released(held)
        for job in pushes:
            if job.ask.staging_offsets is None:
                self._push(job)
        self._push_staged([job for job in pushes if job.ask.staging_offsets is not None])
        settled = self._settle()
        return bool(arrived) or bool(replayed) or bool(pushes) or prepare is not None or settled or finishing

    def _prepare(self, consumer: _ConsumerRank) -> None:
        """Before a consumer rank's first push: load its agent and prepare the descriptor lists
        of the heads we push it, here on this role's thread instead of inside that push."""
        started = time.perf_counter()
        info = consumer.info
        try:
            with self._nixl_lock:
                peer = self.endpoint.peers.admit(info)
                for heads in consumer.targets:
                    self.endpoint.peers.prepared(peer, heads)
                wire_connection(self.endpoint, peer, timeout_s=WIRE_TIMEOUT_S, op=Op.WRITE)  # nor on wiring
                # and on a GPU compiles (or loads) no copier and captures no graph
                self.endpoint.warm_staging([Leg(peer, h, _NO_IDS) for h in consumer.targets], to_slot=True)
        except KvxferError as err:  # the push will say so again, with its request
            log.warning("could not prepare pushes to %s rank %d: %s", info.engine_id, info.tp_rank, err)
            return
        log.info("rank %d prepared pushes to %s rank %d (agent, descriptor lists, connection, staging copiers) in "
                 "%.1f ms", self.rank,
                 info.engine_id, info.tp_rank, (time.perf_counter() - started) * 1e3)

    def _confirm(self, agent: str, notif: m.XferNotif) -> tuple[Held, Outcome] | None:
        transfer_id = notif.request_id
        with self._lock:
            lease = self._held.get(transfer_id)
            consumer = self._consumers.get(agent)
            if consumer is None:
                return None  # an agent no consumer rank handshook with confirms nothing
            if lease is None:
                self._file_early(transfer_id, Notice(agent, notif))
                return None
            try:
                self._check_binding(consumer.peer, lease.held.binding, engine_id=consumer.info.engine_id)
            except KvxferError as err:
                log.warning("ignoring a confirmation of %s: %s", transfer_id[:8], err)
                return None
            lease.confirmed.add(notif.rank)
            if not lease.confirmed >= set(range(consumer.info.tp_size)):
                return None
            return self._end_locked(self._leases.confirm(transfer_id, CONSUMER, now=time.monotonic()))

    def _push(self, job: _Push) -> None:
        """Run one direct push: one still running after INLINE_PUSH_S is finished by later polls."""
        ask, consumer = job.ask, job.consumer
        try:
            _check_in_time(ask)
            with self._nixl_lock:
                peer = self._peer_of(consumer)
                posted = self._post_direct(job, peer)
                if self.endpoint.landed(posted, INLINE_PUSH_S):
                    self.endpoint.finish(posted)
                    return
            with self._lock:
                self._finishing.append((job, posted))
            self._pace.wake()
        except KvxferError as err:
            self._push_failed(job, err)

    def _finish_pushes(self) -> bool:
        """Finish the pushes left running, each once it ended or ran past its deadline (never
        waiting for one under the NIXL lock)."""
        with self._lock:
            finishing, self._finishing = self._finishing, []
        still = []
        for job, posted in finishing:
            try:
                with self._nixl_lock:
                    if self.endpoint.landed(posted, 0.0) or self.endpoint.overdue(posted):
                        self.endpoint.finish(posted)  # overdue: raises TransferTimeout, with its landing
                    else:
                        still.append((job, posted))
            except KvxferError as err:
                self._push_failed(job, err)
        with self._lock:
            self._finishing.extend(still)
        return bool(finishing)

    def _peer_of(self, consumer: _ConsumerRank) -> Peer:
        """The consumer rank's NIXL peer, loaded from its own handshake (under the NIXL lock): a
        peer cached under its engine id and epoch with another agent is never pushed to."""
        peer = self.endpoint.peers.admit(consumer.info)
        if peer.agent_name != consumer.info.agent_name:
            raise AuthError(f"decode {consumer.info.engine_id} rank {consumer.info.tp_rank} is loaded as NIXL agent "
                            f"{peer.agent_name!r}, not the {consumer.info.agent_name!r} that asked; refusing")
        return peer

    def _push_failed(self, job: _Push, err: KvxferError) -> None:
        ask, consumer = job.ask, job.consumer
        log.warning("push of %s to %s rank %d failed: %s", ask.request_id[:8], ask.decode_engine_id,
                    ask.decode_rank, err)
        self.metrics.observe_failure(err.kind)
        self._notify(consumer, ask.request_id, err)
        if isinstance(err, TransferError):  # its endpoint may be dead (a long partition): load it anew
            self._after_failed_push(ask.request_id, (consumer.info.engine_id, consumer.info.tp_rank), err)

    def _after_failed_push(self, transfer_id: str, peer: tuple[str, int], err: TransferError) -> None:
        """Forget the consumer rank, once no push given up to it still runs (kvxfer.agents.landings)."""
        with self._nixl_lock:
            if err.landing is not None:
                self._landings.keep(transfer_id, peer, err.landing)
            if self._landings.may_forget(peer):
                self.endpoint.peers.forget(*peer)

    def _settle(self) -> bool:
        if not self._landings:
            return False
        with self._nixl_lock:
            settled = self._landings.settle()
            for peer in settled.peers:
                self.endpoint.peers.forget(*peer)
        for transfer_id, seconds in settled.requests:
            log.info("rank %d: the push of %s given up at its failure ended %.1f s later", self.rank,
                     transfer_id[:8], seconds)
        return bool(settled.requests)

    def _post_direct(self, job: _Push, peer: Peer) -> Posted:
        held, ask = job.held, job.ask
        remote = shaped_ids(peer.region.desc, ask.block_ids, held.num_tokens)
        legs = [Leg(peer, heads, remote) for heads in job.consumer.targets]
        local = shaped_ids(self.endpoint.region.desc, held.block_ids, held.num_tokens)
        return self.endpoint.post_write(legs, local, held.num_tokens, notif=self._pushed(ask.request_id))

    def _push_staged(self, jobs: list[_Push]) -> None:
        """The queued staged pushes together: every part's gather enqueued before the first
        WRITE is posted, each WRITE posted once its own gather ended (so it runs while the next
        gathers), then all waited for. Pushes for which no slot is free once others are staged
        wait in the queue for the next round (back-pressure; a push past its deadline is refused
        there); with none staged, no free slot means failed WRITEs still hold them: refused."""
        if not jobs:
            return
        staged: list[tuple[_Push, Leg, Staged]] = []
        posted: list[tuple[_Push, Posted]] = []
        failed: set[int] = set()

        def fail(job: _Push, err: Exception) -> None:
            if id(job) not in failed:
                failed.add(id(job))
                self._push_failed(job, _as_kvxfer_error(err, job))

        with self._nixl_lock:
            try:
                for i, job in enumerate(jobs):
                    try:
                        _check_in_time(job.ask)
                        legs = self._staged_legs(job, self._peer_of(job.consumer))
                        if self.endpoint.free_staging_slots < len(legs):
                            if staged:
                                with self._lock:
                                    self._pushes.extendleft(reversed(jobs[i:]))
                                break
                            raise AllocationError(f"staged push of {job.ask.request_id[:8]}: no staging slot free on "
                                                  f"rank {self.rank} (failed WRITEs still hold them)")
                        local = shaped_ids(self.endpoint.region.desc, job.held.block_ids, job.held.num_tokens)
                        for leg, offset in legs:
                            staged.append((job, leg, self.endpoint.stage_write(leg, local, job.held.num_tokens,
                                                                               offset)))
                    except Exception as err:
                        fail(job, err)
                while staged:
                    job, leg, part = staged.pop(0)
                    if id(job) in failed:
                        self.endpoint.unstage(part)
                        continue
                    try:
                        posted.append((job, self.endpoint.post_staged(part, leg,
                                                                      notif=self._pushed(job.ask.request_id))))
                    except Exception as err:
                        fail(job, err)
            finally:  # whatever went wrong above: no slot kept, no posted WRITE left unfinished
                for _, _, part in staged:
                    self.endpoint.unstage(part)
                for job, xfer in posted:
                    try:
                        self.endpoint.finish(xfer)
                    except Exception as err:
                        fail(job, err)

    def _staged_legs(self, job: _Push, peer: Peer) -> list[tuple[Leg, int]]:
        """Our parts of a staged push: each source of the decode rank that is this rank, with the
        offset it reserved for that part (checked against its registered slots area when
        staged)."""
        ask = job.ask
        sources = map_tp(self.endpoint.region.desc.total_heads, self.tp_size, peer.info.tp_size) \
            .sources_of(ask.decode_rank)
        if len(ask.staging_offsets) != len(sources):
            raise PlanError(f"staged push: {len(ask.staging_offsets)} staging offsets for decode rank "
                            f"{ask.decode_rank}, which has {len(sources)} sources")
        return [(Leg(peer, source.heads, _NO_IDS), offset)
                for source, offset in zip(sources, ask.staging_offsets, strict=True)
                if source.prefill_rank == self.rank]

    def _pushed(self, transfer_id: str, error: KvxferError | None = None) -> bytes:
        if error is None:
            notif = m.XferNotif(request_id=transfer_id, rank=self.rank, kind=m.NotifKind.PUSHED)
        else:
            notif = m.XferNotif(request_id=transfer_id, rank=self.rank, status=m.Status.ERROR, error_kind=error.kind,
                                kind=m.NotifKind.PUSHED, message=str(error)[:4000])
        return m.encode_notif(notif)

    def _notify(self, consumer: _ConsumerRank, transfer_id: str, error: KvxferError) -> None:
        """Tell a consumer rank its push was refused or failed, and why, so it stops waiting now
        (best effort; its agent is loaded first: it may not be yet, or again after a failure)."""
        agent = consumer.info.agent_name
        try:
            with self._nixl_lock:
                self._peer_of(consumer)
                self.endpoint.agent.send_notif(agent, self._pushed(transfer_id, error))
        except KvxferError as err:
            log.info("could not tell %s that the push of %s failed: %s", agent, transfer_id[:8], err)

    def _check_binding(self, peer: PeerInfo, binding: m.Binding, *, engine_id: str | None = None) -> None:
        if self._grant_unbound and not (binding.consumer_key or binding.consumer_engine_id):
            return
        if peer.public_key is None and engine_id is None:
            return  # insecure mode, a message that names no engine: nothing to compare (docs/security.md)
        check_binding(peer, binding, engine_id=engine_id)

    def _targets(self, consumer_tp: int, decode_rank: int) -> tuple[HeadRange, ...]:
        mapping = map_tp(self.endpoint.region.desc.total_heads, self.tp_size, consumer_tp)
        return tuple(a.heads for a in mapping.targets_of(self.rank) if a.decode_rank == decode_rank)

    # -- ending leases ------------------------------------------------------------------------------

    def _end_locked(self, released: Released | None) -> tuple[Held, Outcome] | None:
        if released is None:
            return None
        lease = self._held.pop(released.request_id)
        self._ended[released.request_id] = released.outcome
        while len(self._ended) > ENDED_MAX:
            self._ended.popitem(last=False)
        return lease.held, released.outcome

    def _released(self, ended: tuple[Held, Outcome] | None) -> None:
        if ended is not None:
            log.debug("lease of %s ended on rank %d: %s", ended[0].transfer_id[:8], self.rank, ended[1].value)
            self._on_release(*ended)

    def _file_early(self, transfer_id: str, event: Notice) -> bool:
        """Keep a notification for a request not held yet (its `hold` replays it); False if the
        early files are full (EARLY_MAX requests, EARLY_PER_REQUEST notifications each)."""
        if transfer_id in self._ended:
            return True  # a confirmation after its lease ended (expired or aborted): nothing to do
        filed = self._early.get(transfer_id)
        if filed is None:
            if len(self._early) >= EARLY_MAX:
                return False
            filed = self._early[transfer_id] = (time.monotonic(), [])
        if len(filed[1]) >= EARLY_PER_REQUEST:
            return False
        filed[1].append(event)
        return True

    def _forget_early_locked(self) -> None:
        cutoff = time.monotonic() - EARLY_TTL_S
        for transfer_id in [t for t, (seen, _) in self._early.items() if seen < cutoff]:
            del self._early[transfer_id]


def _as_kvxfer_error(err: Exception, job: _Push) -> KvxferError:
    """A push's failure as the typed error its consumer is told; anything else is a bug, logged
    with its traceback here and reported as a transfer failure."""
    if isinstance(err, KvxferError):
        return err
    log.error("push of %s: unexpected %s", job.ask.request_id[:8], type(err).__name__, exc_info=err)
    return KvxferError(f"push of {job.ask.request_id[:8]} failed: {type(err).__name__}: {err}")


def _check_in_time(ask: m.PushAsk) -> None:
    late = time.time() - ask.not_after_unix
    if late > 0:
        raise TransferTimeout(f"push of {ask.request_id[:8]} to decode rank {ask.decode_rank}: the consumer "
                              f"stopped waiting {late:.3f} s ago; refusing to write into memory it may have reused")
