"""The consumer role of the transfer protocol: one per consumer (decode) rank, driven alike by
the daemons' decode ranks and the vLLM connector's consumer workers.

A consumer rank loads its share of a request (`load`) from the producer ranks the TP mapping
gives it, talking to them directly:
1. Handshake with every producer rank of the request's producer, once per (rank, boot epoch):
   their NIXL agents and caches, and the key this consumer checks parameters with.
2. Check the parameters: their MAC (`capability`), that they were not used before, and that the
   lease still runs (renewing it first, one round trip, when it is close to its end).
3. READ: one transfer per producer rank, posted with no side-channel round trip.
   WRITE: one `PushAsk` notification per producer rank, sent at once (signed with our own key,
   `capability.ask_key`); each rank pushes into our blocks (or our staging slot, then we
   scatter) and notifies `PUSHED`, or refuses with a `PUSHED` error saying why; a wait that
   lasts pings them (`liveness`: a producer that died never refuses).
4. Confirm: a `DONE` notification to every producer rank; each ends its lease on the last one.
A failure raises a KvxferError naming why (`explain` turns an unreachable or restarted producer
into one); the driver then aborts the lease (`LeaseClient.abort`) and reports the request failed.
A READ given up while NIXL still runs it (a deadline during a partition) can land later: until
`idle` finds it ended (`landing`, then `take_settled`), the driver keeps the request's blocks
from other requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvxfer.agents import capability
from kvxfer.agents import messages as m
from kvxfer.agents.compat import check_compatible
from kvxfer.agents.endpoint import Endpoint, Leg, TransferSummary, shaped_ids
from kvxfer.agents.heartbeat import LeaseClient
from kvxfer.agents.inbox import Inbox
from kvxfer.agents.landings import Landings
from kvxfer.agents.liveness import PushWatch, gone
from kvxfer.agents.peers import Peer
from kvxfer.agents.sidechannel import ClientCache, Target, producer_target
from kvxfer.agents.staged_transfer import Reservation, release_later
from kvxfer.errors import (
    AuthError,
    HandshakeError,
    KvxferError,
    LeaseError,
    PeerGoneError,
    PlanError,
    TransferError,
    TransferTimeout,
)
from kvxfer.planning import Assignment, map_tp
from kvxfer.planning.cost import FabricCosts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Load:
    """One consumer rank's share of loading a request."""

    params: m.TransferParams
    local_ids: np.ndarray  # this rank's blocks of the loaded tokens, shaped for its layout
    num_tokens: int  # tokens loaded, after `skip_tokens` the consumer had cached
    skip_tokens: int = 0
    mode: m.Mode = m.Mode.READ
    staged: bool = False  # WRITE: ask for the push into a staging slot (direct if none is free)
    valid_until_ms: int = 0  # the lease's latest known end (0: the parameters' own)
    not_after_unix: float = 0.0  # WRITE: producers start the push by then, or refuse it


@dataclass(frozen=True)
class Loaded:
    summary: TransferSummary
    staged: bool


@dataclass(frozen=True)
class ProducerLink:
    """A producer rank this consumer rank handshook with, at one boot epoch."""

    peer: Peer
    params_key: bytes
    unbound_params_key: bytes
    target: Target  # its side channel
    ask_key: bytes  # what our push requests to it are signed with (`capability.ask_key`)


class Consumer:
    def __init__(self, endpoint: Endpoint, *, clients: ClientCache, leases: LeaseClient,
                 nixl_lock: threading.RLock, identity: str, handshake_timeout_s: float,
                 request_timeout_s: float, modes: tuple[m.Mode, ...] = (m.Mode.READ, m.Mode.WRITE),
                 check_producer: Callable[[m.EngineInfo, str], None] | None = None) -> None:
        self.endpoint = endpoint
        self.rank = endpoint.identity.tp_rank
        self.tp_size = endpoint.identity.tp_size
        self.identity = identity  # capability.identity_of_peer of this consumer
        self.clients = clients
        self.leases = leases
        self.handshake_timeout_s = handshake_timeout_s
        self.request_timeout_s = request_timeout_s  # a push asked for: producers start it within this
        self._nixl = nixl_lock
        self._hello = m.HandshakeRequest(engine=endpoint.info(modes))
        self._check_producer = check_producer  # the driver's own pairing rules, if any
        self._links: dict[tuple[str, int], ProducerLink] = {}
        self._sources: dict[int, tuple[Assignment, ...]] = {}  # producer TP size -> this rank's sources
        self._once = capability.OnceOnly()
        self._to_confirm: deque[tuple[m.TransferParams, list[ProducerLink]]] = deque()
        self._landings: Landings[str] = Landings()  # given-up READs, by transfer id, with their producer
        self._settled: list[str] = []  # transfer ids whose given-up READs ended since `take_settled`
        # Guards the two above, held only for bookkeeping: a driver asks `landing` from threads
        # that must not wait behind another load's transfer (which holds the NIXL lock).
        self._landing_lock = threading.Lock()
        self.inbox = Inbox(endpoint.agent, lock=nixl_lock, metrics=endpoint.metrics)

    @property
    def nixl_lock(self) -> threading.RLock:
        """The lock around this rank's NIXL agent (shared with its driver)."""
        return self._nixl

    # -- one request ------------------------------------------------------------------------------

    def load(self, job: Load) -> Loaded:
        params = job.params
        self.check(params, self.link(params, 0), job.valid_until_ms)  # before meeting other ranks
        links = self.links(params)
        sources = self.sources(params)
        try:
            if job.mode is m.Mode.READ:
                summary, staged = self._read(job, links, sources), False
            else:
                summary, staged = self._pushed(job, links, sources)
        except TransferError as err:
            with self._nixl:
                with self._landing_lock:
                    if err.landing is not None:
                        self._landings.keep(params.request_id, params.engine_id, err.landing)
                    forget_now = self._landings.may_forget(params.engine_id)
                if forget_now:
                    self.forget(params.engine_id)
            raise
        self._to_confirm.append((params, links))  # off the request's path: `idle` sends them
        return Loaded(summary, staged)

    def forget(self, engine_id: str) -> None:
        """After a failed transfer: meet every rank of that producer again on the next request.
        A partition longer than UCX's keepalive leaves its endpoints dead at an unchanged boot
        epoch; a new handshake (and NIXL connection) is what heals it. While a READ given up
        from it still runs, not yet (`Landings.may_forget`): the old connection stays in use, and
        works again once a partition ends, or fails, ending the landing, if UCX declared it dead."""
        for key in [k for k in self._links if k[0] == engine_id]:
            del self._links[key]
            with self._nixl:
                self.endpoint.peers.forget(*key)

    def check(self, params: m.TransferParams, link: ProducerLink, valid_until_ms: int) -> None:
        """Refuse forged, foreign or replayed parameters and leases that have ended."""
        binding = capability.identity_of_binding(params.binding)
        if binding and binding != self.identity:
            raise AuthError(f"transfer parameters of {params.request_id[:8]} are bound to another consumer")
        key = link.params_key if binding else link.unbound_params_key
        if not key:
            raise AuthError(f"transfer parameters of {params.request_id[:8]} are bound to no consumer, and "
                            f"producer {params.engine_id} grants unbound requests only without CURVE")
        capability.check(params, key)
        self._check_lease(params, valid_until_ms or params.expires_unix_ms)
        self._once.use(params)

    def _check_lease(self, params: m.TransferParams, valid_until_ms: int) -> None:
        """A lease within half its length of its end is renewed first: one round trip, only for
        a request that waited that long without a heartbeat."""
        if valid_until_ms - time.time() * 1e3 > params.lease_s * 500:
            return
        renewal = self.leases.renew([params])
        if params.request_id not in renewal.expires_ms:
            raise LeaseError(f"request {params.request_id[:8]}: its lease at {params.engine_id} has ended "
                             f"(expired, aborted or never granted); its blocks may hold other data now")

    def sources(self, params: m.TransferParams) -> tuple[Assignment, ...]:
        """The producer ranks and heads this rank loads from (the TP mapping, once per TP size)."""
        found = self._sources.get(params.tp_size)
        if found is None:
            mapping = map_tp(self.endpoint.region.desc.total_heads, params.tp_size, self.tp_size)
            found = self._sources[params.tp_size] = tuple(mapping.sources_of(self.rank))
        return found

    def _remote_ids(self, job: Load, peer: Peer) -> np.ndarray:
        block_size = peer.region.desc.block_size
        if job.skip_tokens % block_size:
            raise PlanError(f"{job.skip_tokens} prompt tokens were cached locally, not a multiple of the "
                            f"producer's block_size={block_size}")
        return shaped_ids(peer.region.desc, job.params.block_ids, job.num_tokens,
                          skip_blocks=job.skip_tokens // block_size)

    def _read(self, job: Load, links: list[ProducerLink], sources: tuple[Assignment, ...]) -> TransferSummary:
        legs = [Leg(links[s.prefill_rank].peer, s.heads, self._remote_ids(job, links[s.prefill_rank].peer))
                for s in sources]
        with self._nixl:
            return self.endpoint.read(legs, job.local_ids, job.num_tokens)

    # -- WRITE ------------------------------------------------------------------------------------

    def _pushed(self, job: Load, links: list[ProducerLink],
                sources: tuple[Assignment, ...]) -> tuple[TransferSummary, bool]:
        """Ask each producer rank for its push at once (a `PushAsk` notification each, no side
        channel), wait for every one's `PUSHED`, then scatter from the staging slot if there is
        one. A refusal comes as a `PUSHED` error with its reason. A failure keeps the slot away
        from other requests until no push started in time can land in it."""
        params = job.params
        started = time.perf_counter()
        reservation = self._reserve(job, links, sources) if job.staged else None
        ranks = sorted({s.prefill_rank for s in sources})
        ask = m.PushAsk(request_id=params.request_id, decode_rank=self.rank,
                        block_ids=job.local_ids.reshape(-1).tolist(),
                        decode_engine_id=self.endpoint.identity.engine_id,
                        staging_offsets=reservation.wire_offsets() if reservation else None,
                        not_after_unix=job.not_after_unix)
        push_s = self.endpoint.deadline.seconds(self.expected_bytes(params, job.num_tokens))
        watch = PushWatch(self.clients, params, {r: links[r].target for r in ranks}, timeout_s=self.request_timeout_s)
        try:
            with self._nixl:
                for rank in ranks:
                    signed = capability.sign_ask(ask, links[rank].ask_key)
                    self.endpoint.agent.send_notif(links[rank].peer.agent_name, m.encode_notif(signed))
            self.inbox.wait(params.request_id, m.NotifKind.PUSHED, {r: links[r].peer.agent_name for r in ranks},
                            timeout_s=max(0.0, job.not_after_unix - time.time()) + push_s,
                            what=lambda missing: f"request {params.request_id[:8]}: pushes from producer "
                                                 f"rank(s) {sorted(missing)}", watch=watch.check)
            if reservation is not None:
                self._scatter(reservation)
        except KvxferError:
            if reservation is not None:
                release_later(self.endpoint.staging, reservation,
                              max(0.0, job.not_after_unix + push_s - time.time()))
            raise
        finally:
            watch.close()
        num_bytes = self.expected_bytes(params, job.num_tokens)
        return TransferSummary(m.Mode.WRITE, num_bytes=num_bytes, num_descriptors=len(ranks) if reservation else 0,
                               seconds=time.perf_counter() - started,
                               peers=[f"{params.engine_id}/{r}" for r in ranks]), reservation is not None

    def _reserve(self, job: Load, links: list[ProducerLink], sources: tuple[Assignment, ...]) -> Reservation | None:
        """A staging slot for every source's part, or None (the push goes directly into our
        blocks): staging is off on a side, the request does not fit a slot, or no slot freed in
        time (back-pressure)."""
        legs = [Leg(links[s.prefill_rank].peer, s.heads, np.empty(0)) for s in sources]
        with self._nixl:
            parts = self.endpoint.staged_parts(legs, job.local_ids, job.num_tokens)
        if parts is None:
            return None
        try:
            return self.endpoint.reserve(parts)
        except TransferTimeout as err:
            log.info("request %s: no staging slot freed in time on rank %d (%s): moving it directly",
                     job.params.request_id[:8], self.rank, err)
            return None

    def _scatter(self, reservation: Reservation) -> None:
        try:
            reservation.scatter()
        finally:
            self.endpoint.staging.pool.release(reservation.slot)

    def expected_bytes(self, params: m.TransferParams, num_tokens: int) -> int:
        """Bytes of `num_tokens` tokens this rank receives (every head it reads)."""
        desc = self.endpoint.region.desc
        heads = sum(s.heads.size for s in self.sources(params))
        return heads * desc.row_bytes * desc.num_kv * desc.num_layers * num_tokens

    # -- producers --------------------------------------------------------------------------------

    def links(self, params: m.TransferParams) -> list[ProducerLink]:
        """Every producer rank of the request's producer (all get our DONE), by rank."""
        return [self.link(params, rank) for rank in range(params.tp_size)]

    def link(self, params: m.TransferParams, rank: int) -> ProducerLink:
        """The producer rank as a NIXL peer, handshaking when unknown or restarted."""
        known = self._links.get((params.engine_id, rank))
        if known is not None and known.peer.boot_epoch == params.boot_epoch:
            return known
        target = producer_target(params, rank)
        address = target.address
        started = time.perf_counter()
        reply = self.clients.request(target, self._hello, timeout_s=self.handshake_timeout_s)
        if not isinstance(reply, m.HandshakeReply):
            raise HandshakeError(f"{address} answered {type(reply).__name__} to a handshake")
        remote = reply.engine
        check_compatible(self._hello, reply, peer=address)
        if remote.engine_id != params.engine_id or remote.boot_epoch != params.boot_epoch:
            raise PeerGoneError(gone(params, rank, address, remote.engine_id, remote.boot_epoch))
        if self._check_producer is not None:
            self._check_producer(remote, f"{params.engine_id}/{rank}")
        with self._nixl:
            peer = self.endpoint.peers.admit(remote)
        link = ProducerLink(peer, reply.params_key, reply.unbound_params_key, target,
                            capability.ask_key(reply.params_key))
        self._links[params.engine_id, rank] = link
        log.info("handshake with producer %s rank %d (epoch %d) from rank %d: %.1f ms", params.engine_id,
                 rank, params.boot_epoch, self.rank, (time.perf_counter() - started) * 1e3)
        return link

    def _confirm(self, params: m.TransferParams, links: list[ProducerLink]) -> None:
        """DONE to every producer rank. One that cannot be told keeps the lease until it expires:
        the load itself succeeded."""
        done = m.encode_notif(m.XferNotif(request_id=params.request_id, rank=self.rank, kind=m.NotifKind.DONE))
        with self._nixl:
            for link in links:
                try:
                    self.endpoint.agent.send_notif(link.peer.agent_name, done)
                except KvxferError as err:
                    log.warning("request %s: could not confirm to %s rank %d: %s", params.request_id[:8],
                                params.engine_id, link.peer.rank, err)

    def idle(self) -> bool:
        """Between loads (a driver calls it soon after each): confirm the loads done since the
        last call, drive NIXL (without a progress thread a notification leaves only then;
        connections being set up) and file what arrived. True if there was work."""
        confirmed = 0
        while self._to_confirm:
            self._confirm(*self._to_confirm.popleft())
            confirmed += 1
        return self.inbox.collect() + confirmed + self._settle() > 0

    def landing(self, request_id: str) -> bool:
        """Whether a failed load of `request_id` left READs running that may still write its
        blocks: its driver gives the blocks back only once `take_settled` names it."""
        with self._landing_lock:
            return self._landings.running(request_id)

    def take_settled(self) -> list[str]:
        """Transfer ids whose given-up READs have ended (landed or failed) since the last call."""
        with self._landing_lock:
            settled, self._settled = self._settled, []
        return settled

    def _settle(self) -> int:
        if not self._landings:
            return 0
        with self._nixl:
            with self._landing_lock:  # polling a landing only asks NIXL for states: it never waits
                settled = self._landings.settle()
                self._settled.extend(transfer_id for transfer_id, _ in settled.requests)
            for engine_id in settled.peers:
                self.forget(engine_id)
        for transfer_id, seconds in settled.requests:
            log.info("request %s: the READs given up at its failure ended %.1f s later; its blocks can be "
                     "reused", transfer_id[:8], seconds)
        return len(settled.requests)

    def calibrate(self, params: m.TransferParams) -> FabricCosts | None:
        """The cost model's numbers against the first producer rank we read from."""
        link = self.link(params, self.sources(params)[0].prefill_rank)
        with self._nixl:
            return self.endpoint.calibrate(link.peer)

    def explain(self, params: m.TransferParams, err: KvxferError) -> KvxferError:
        """After a failed load: a producer that restarted or stopped answering is the reason
        (one round trip, off the success path); else the error itself."""
        target = producer_target(params, 0)
        address = target.address
        try:
            pong = self.clients.request(target, m.Ping(), timeout_s=min(1.0, self.handshake_timeout_s))
        except KvxferError as probe:
            return PeerGoneError(f"producer {params.engine_id} at {address} does not answer ({probe}); the "
                                 f"request's KV is lost with it ({err.kind}: {err})")
        if isinstance(pong, m.Pong) and (pong.engine_id, pong.boot_epoch) != (params.engine_id, params.boot_epoch):
            return PeerGoneError(gone(params, 0, address, pong.engine_id, pong.boot_epoch))
        return err

    def close(self) -> None:
        self.clients.close()

