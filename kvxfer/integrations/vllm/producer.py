"""Producer (prefill) rank: serve handshakes, hold finished requests under leases, and end each
lease exactly once: every consumer rank that reads from this rank confirmed (a NIXL notification
after its READ, or our own completed WRITE), the consumer gave up (Abort / TransferDone with an
error), or the lease expired. Ended leases become vLLM's `finished_sending`, and vLLM frees the
blocks (vLLM refcounts blocks shared through its prefix cache, so leases here carry no block ids).

Threads: the side-channel server thread runs `handle` (short, no NIXL); the worker's service
thread runs `poll` and the queued writes (all NIXL calls); vLLM's thread runs `hold` and `take`.
One lock guards the state they share.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from kvxfer.agents import messages as m
from kvxfer.agents.compat import check_compatible
from kvxfer.agents.endpoint import Endpoint, Leg
from kvxfer.agents.leases import LeaseTable, Released
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.sidechannel import PeerInfo, check_binding
from kvxfer.errors import KvxferError, LeaseError
from kvxfer.integrations.vllm.params import SendJob
from kvxfer.layouts import num_blocks_for
from kvxfer.planning import map_tp

log = logging.getLogger(__name__)

CONSUMER = "consumer"  # the one logical consumer of a lease: its ranks are tallied below
_EARLY_TTL_S = 60.0  # confirmations that beat their lease here are kept this long
_EARLY_MAX = 4096  # and at most this many requests' worth


@dataclass
class _Held:
    job: SendJob
    confirmed: set[int] = field(default_factory=set)  # consumer ranks that confirmed


@dataclass(frozen=True)
class _Consumer:
    """A consumer rank as its handshake (authenticated by CURVE) described it."""

    info: m.EngineInfo
    public_key: str | None


@dataclass(frozen=True)
class _WriteJob:
    transfer_id: str
    decode_rank: int
    block_ids: tuple[int, ...]
    consumer: _Consumer


class Producer:
    def __init__(self, endpoint: Endpoint, *, lease_s: float, metrics: TransferMetrics) -> None:
        self.endpoint = endpoint
        self.rank = endpoint.identity.tp_rank
        self.tp_size = endpoint.identity.tp_size
        self.info = endpoint.info()  # precomputed: the server thread never calls NIXL
        self._leases = LeaseTable(ttl_s=lease_s, metrics=metrics)
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}  # transfer id -> request
        self._early: dict[str, tuple[float, list[tuple[str, int]]]] = {}  # id -> (seen, [(agent, rank)])
        self._consumers: dict[str, _Consumer] = {}  # NIXL agent name -> consumer
        self._writes: deque[_WriteJob] = deque()
        self._finished: set[str] = set()  # vLLM request ids whose lease ended

    # -- vLLM's thread ---------------------------------------------------------------------------

    def hold(self, job: SendJob) -> None:
        """Start the lease of a finished request (its blocks stay allocated until it ends)."""
        with self._lock:
            self._leases.acquire(job.params.request_id, (), [CONSUMER], now=time.monotonic())
            self._held[job.params.request_id] = _Held(job)
            log.info("kvxfer holding request=%s (transfer %s) for %.0f s", job.req_id,
                     job.params.request_id, self._leases.ttl_s)
            early = self._early.pop(job.params.request_id, None)
            for agent, rank in early[1] if early else ():
                self._confirm_locked(job.params.request_id, agent, rank)

    def take_finished(self) -> set[str]:
        with self._lock:
            done, self._finished = self._finished, set()
        return done

    # -- side-channel thread ---------------------------------------------------------------------

    def handle(self, peer: PeerInfo, msg: m.Message) -> m.Message:
        match msg:
            case m.HandshakeRequest():
                return self._handshake(peer, msg)
            case m.TransferDone():
                return self._done(peer, msg)
            case m.Abort():
                self._abort(peer, msg.request_id, f"consumer aborted: {msg.reason}")
                return m.Ack(request_id=msg.request_id)
            case m.LeaseRenew():
                return self._renew(peer, msg)
            case m.WriteRequest():
                return self._write_request(peer, msg)
        return m.ErrorReply(kind="malformed", message=f"a producer does not answer {type(msg).__name__}")

    def _handshake(self, peer: PeerInfo, msg: m.HandshakeRequest) -> m.Message:
        reply = m.HandshakeReply(engine=self.info)
        check_compatible(reply, msg, peer=f"{msg.engine.engine_id}/{msg.engine.tp_rank}")
        with self._lock:
            self._consumers[msg.engine.agent_name] = _Consumer(msg.engine, peer.public_key)
        return reply

    def _done(self, peer: PeerInfo, msg: m.TransferDone) -> m.Message:
        """A consumer is done with this rank for a request: it read nothing from us (our heads are
        read from a replica), or it failed and gives the blocks back."""
        if msg.status is m.Status.OK:
            self._abort(peer, msg.request_id, "consumer needs nothing from this rank")
        else:
            self._abort(peer, msg.request_id, f"consumer failed: {msg.error_kind}: {msg.error_message}")
        return m.Ack(request_id=msg.request_id)

    def _renew(self, peer: PeerInfo, msg: m.LeaseRenew) -> m.Message:
        renewed, unknown = [], []
        with self._lock:
            for transfer_id in msg.request_ids:
                held = self._held.get(transfer_id)
                try:
                    if held is None:
                        raise LeaseError(f"request {transfer_id}: not held")
                    check_binding(peer, held.job.params.binding)
                    self._leases.renew(transfer_id, CONSUMER, now=time.monotonic())
                    renewed.append(transfer_id)
                except KvxferError:
                    unknown.append(transfer_id)
        return m.LeaseRenewed(renewed=renewed, unknown=tuple(unknown))

    def _write_request(self, peer: PeerInfo, msg: m.WriteRequest) -> m.Message:
        with self._lock:
            held = self._held.get(msg.request_id)
            if held is None:
                raise LeaseError(f"request {msg.request_id}: not held by rank {self.rank} (expired, "
                                 f"released, or never produced)")
            check_binding(peer, held.job.params.binding)
            consumer = next((c for c in self._consumers.values()
                             if c.public_key == peer.public_key and c.info.tp_rank == msg.decode_rank
                             and c.info.engine_id == msg.decode_engine_id), None)
            if consumer is None:
                raise LeaseError(f"request {msg.request_id}: decode rank {msg.decode_rank} has not handshaken")
            self._writes.append(_WriteJob(msg.request_id, msg.decode_rank, tuple(msg.block_ids), consumer))
        return m.Ack(request_id=msg.request_id)

    # -- service thread --------------------------------------------------------------------------

    def poll(self) -> bool:
        """Drive NIXL, apply confirmations, run queued writes, expire leases. True if it did work."""
        notifs = self.endpoint.agent.collect_notifs()
        with self._lock:
            for agent, payload in notifs:
                self._notif_locked(agent, payload)
            write = self._writes.popleft() if self._writes else None
            self._expire_locked()
        if write is not None:
            self._write(write)
        return bool(notifs) or write is not None

    def _notif_locked(self, agent: str, payload: bytes) -> None:
        try:
            notif = m.decode_notif(payload)
        except Exception as err:  # a peer's bytes never stop the loop
            log.warning("dropping malformed notification from %s: %s", agent, err)
            return
        self._confirm_locked(notif.request_id, agent, notif.rank)

    def _confirm_locked(self, transfer_id: str, agent: str, rank: int) -> None:
        held = self._held.get(transfer_id)
        consumer = self._consumers.get(agent)
        if held is None or consumer is None:
            if transfer_id in self._early or len(self._early) < _EARLY_MAX:
                self._early.setdefault(transfer_id, (time.monotonic(), []))[1].append((agent, rank))
            return
        try:
            check_binding(PeerInfo(b"", consumer.public_key, ""), held.job.params.binding,
                          engine_id=consumer.info.engine_id)
        except KvxferError as err:
            log.warning("ignoring confirmation of %s: %s", transfer_id, err)
            return
        held.confirmed.add(rank)
        if held.confirmed >= self._readers(consumer.info.tp_size):
            self._end_locked(self._leases.confirm(transfer_id, CONSUMER, now=time.monotonic()))

    def _readers(self, consumer_tp: int) -> set[int]:
        """Consumer ranks that read (or are written) this rank's heads."""
        heads = self.endpoint.region.desc.total_heads
        return {a.decode_rank for a in map_tp(heads, self.tp_size, consumer_tp).targets_of(self.rank)}

    def _write(self, job: _WriteJob) -> None:
        with self._lock:
            held = self._held.get(job.transfer_id)
        if held is None:
            log.warning("write of %s skipped: lease already ended", job.transfer_id)
            return
        params, info = held.job.params, job.consumer.info
        try:
            peer = self.endpoint.peers.admit(info)
            mapping = map_tp(self.endpoint.region.desc.total_heads, self.tp_size, info.tp_size)
            ids = np.asarray(job.block_ids, dtype=np.int64)
            legs = [Leg(peer, a.heads, ids) for a in mapping.targets_of(self.rank)
                    if a.decode_rank == job.decode_rank]
            local = np.asarray(params.block_ids[:num_blocks_for(params.num_tokens, self.endpoint.region.desc.block_size)])
            self.endpoint.write(job.transfer_id, legs, local, params.num_tokens)
        except KvxferError as err:
            log.error("write of %s to %s/%d failed (%s): %s", job.transfer_id, info.engine_id,
                      job.decode_rank, err.kind, err)
            self._abort(None, job.transfer_id, f"write failed: {err}")
            return
        with self._lock:
            self._confirm_locked(job.transfer_id, info.agent_name, job.decode_rank)

    def _expire_locked(self) -> None:
        for released in self._leases.expire(time.monotonic()):
            log.warning("lease of %s expired before every consumer confirmed", released.request_id)
            self._end_locked(released)
        cutoff = time.monotonic() - _EARLY_TTL_S
        for transfer_id in [t for t, (seen, _) in self._early.items() if seen < cutoff]:
            del self._early[transfer_id]

    # -- ending leases ---------------------------------------------------------------------------

    def _abort(self, peer: PeerInfo | None, transfer_id: str, why: str) -> None:
        with self._lock:
            held = self._held.get(transfer_id)
            if held is None:
                return  # already ended: aborts and releases are idempotent
            if peer is not None:
                check_binding(peer, held.job.params.binding)
            log.info("lease of %s ends early: %s", transfer_id, why)
            self._end_locked(self._leases.abort(transfer_id))

    def _end_locked(self, released: Released | None) -> None:
        if released is None:
            return
        held = self._held.pop(released.request_id, None)
        if held is not None:
            log.info("kvxfer lease of request=%s (transfer %s) ended: %s", held.job.req_id,
                     released.request_id, released.outcome.value)
            self._finished.add(held.job.req_id)
