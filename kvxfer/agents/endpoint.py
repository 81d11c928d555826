"""One rank's transfer endpoint: its registered cache, its NIXL agent and its peers.

The daemons and the vLLM plugin drive transfers through this class only. READ (decode pulls) and
WRITE (prefill pushes into blocks decode allocated) share everything but the direction: the
pairing of two caches is symmetric, so the same prepared lists serve both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kvxfer.agents.calibrate import SMALL_PROBE_BYTES, Probe, calibrate, num_small_probes
from kvxfer.agents.messages import EngineInfo, Mode, RegionInfo, Role
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.nixl_agent import (
    AgentConfig,
    Backoff,
    NixlAgent,
    Op,
    PollPolicy,
    Transfer,
    device_id,
)
from kvxfer.agents.peers import Peer, PeerTable
from kvxfer.agents.staged_transfer import (
    PROBE_BYTES,
    Parts,
    Reservation,
    Staged,
    StagingArea,
    StagingConfig,
    post_part,
    reserve,
    stage_part,
)
from kvxfer.agents.staging import Slot
from kvxfer.deadline import Deadline
from kvxfer.errors import ConfigError, KvxferError, Landing, TransferError
from kvxfer.layouts import CacheDesc, CacheRegion
from kvxfer.planning import Fallback, HeadRange, request_spans
from kvxfer.planning.cost import FabricCosts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    engine_id: str
    boot_epoch: int
    role: Role
    tp_size: int
    tp_rank: int
    model_fingerprint: str


DeadlinePolicy = Deadline  # the name the daemons and the vLLM worker import


@dataclass(frozen=True)
class Leg:
    """One peer's part of a request: its heads and its block ids."""

    peer: Peer
    heads: HeadRange
    remote_ids: np.ndarray


@dataclass(frozen=True)
class Posted:
    """One request's transfers to its legs, posted and not yet waited for."""

    op: Op
    legs: list[Leg]
    transfers: list[Transfer]
    started: float  # perf_counter at the post: the deadline counts from here
    slots: tuple[Slot, ...] = ()  # staging slots of ours the transfers read: freed once they end

    @property
    def num_bytes(self) -> int:
        return sum(x.num_bytes for x in self.transfers)


@dataclass
class TransferSummary:
    """What one rank moved for one request."""

    mode: Mode
    num_bytes: int = 0
    num_descriptors: int = 0
    seconds: float = 0.0
    peers: list[str] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class Endpoint:
    def __init__(self, identity: Identity, tensors: list[torch.Tensor], desc: CacheDesc, *,
                 agent_config: AgentConfig, fallback: Fallback = Fallback.NONE,
                 deadline: Deadline = Deadline(),
                 metrics: TransferMetrics | None = None, staging: StagingConfig | None = None) -> None:
        # tensors: one per layer, each shaped desc.shape
        self.identity = identity
        self.deadline = deadline
        self.metrics = metrics
        self.tensors = tensors
        self.agent = NixlAgent(agent_config, metrics=metrics)
        try:
            self.mem = self.agent.register(tensors)
            self.region = CacheRegion(desc, np.array([t.data_ptr() for t in tensors], dtype=np.uint64),
                                      device_id(tensors[0]))
            self.peers = PeerTable(self.agent, self.region, self.mem, fallback=fallback)
            self.staging = StagingArea(self.agent, staging, tensors[0].device) if staging is not None else None
            self._unsettled: list[tuple[Landing, Slot]] = []  # slots failed WRITEs may still read
        except BaseException:
            self.agent.close()
            raise

    def info(self, modes: tuple[Mode, ...] = (Mode.READ, Mode.WRITE)) -> EngineInfo:
        """What this rank tells peers at handshake (its agent metadata and cache)."""
        i = self.identity
        region = RegionInfo(desc=self.region.desc, layer_addrs=[int(a) for a in self.region.layer_addrs],
                            device_id=self.region.device_id, memory=self.mem)
        return EngineInfo(engine_id=i.engine_id, boot_epoch=i.boot_epoch, role=i.role, tp_size=i.tp_size,
                          tp_rank=i.tp_rank, model_fingerprint=i.model_fingerprint,
                          agent_name=self.agent.name, agent_metadata=self.agent.metadata(),
                          regions=[region], modes=modes,
                          staging=self.staging.info() if self.staging is not None else None)

    def read(self, legs: list[Leg], local_ids: np.ndarray, num_tokens: int) -> TransferSummary:
        """Pull every leg into our blocks `local_ids` (no notification: the caller confirms)."""
        return self._run(Op.READ, legs, local_ids, num_tokens, b"")

    def write(self, request_id: str, legs: list[Leg], local_ids: np.ndarray, num_tokens: int, *,
              notif: bytes) -> TransferSummary:
        """Push our blocks `local_ids` into each leg's blocks; each peer gets `notif` once its
        bytes landed."""
        return self._run(Op.WRITE, legs, local_ids, num_tokens, notif)

    def post_write(self, legs: list[Leg], local_ids: np.ndarray, num_tokens: int, *, notif: bytes) -> Posted:
        """`write` without the wait: every leg posted (`landed`, then `finish`)."""
        return self._post(Op.WRITE, legs, local_ids, num_tokens, notif)

    def landed(self, posted: Posted, within_s: float) -> bool:
        """Drive `posted` for at most `within_s`: True once every transfer ended (`finish` then
        returns at once), False if some still run. A failure NIXL reports raises it (the
        transfers still running given up, as `finish` would)."""
        until = time.monotonic() + within_s
        backoff = Backoff(PollPolicy.for_transfers(self.agent.config.threading))
        try:
            while not all([x.poll() for x in posted.transfers]):
                if time.monotonic() > until:
                    return False
                backoff.pause()
        except TransferError as err:
            self.agent.abandon(posted.transfers, err)
            self._free_slots(posted, err.landing)
            raise
        return True

    def overdue(self, posted: Posted) -> bool:
        """Whether `posted` ran past its deadline (`finish` then raises TransferTimeout)."""
        return time.perf_counter() - posted.started > self.deadline.seconds(posted.num_bytes)

    def finish(self, posted: Posted) -> TransferSummary:
        """Wait for `posted` within its deadline (counted from its post); raises with a landing
        if it fails or runs past it."""
        timeout_s = self.deadline.seconds(posted.num_bytes) - (time.perf_counter() - posted.started)
        try:
            stats = self.agent.wait(posted.transfers, timeout_s=max(0.0, timeout_s))  # may raise with a landing
        except TransferError as err:
            self._free_slots(posted, err.landing)
            raise
        self._free_slots(posted, None)
        done = zip(stats, posted.transfers, strict=True)
        summary = TransferSummary(Mode.READ if posted.op is Op.READ else Mode.WRITE,
                                  seconds=time.perf_counter() - posted.started,
                                  peers=[f"{leg.peer.engine_id}/{leg.peer.rank}" for leg in posted.legs])
        for s, x in done:
            summary.num_bytes += s.num_bytes or x.num_bytes
            summary.num_descriptors += s.num_descriptors or x.num_descriptors
        return summary

    def _run(self, op: Op, legs: list[Leg], local_ids: np.ndarray, num_tokens: int,
             notif: bytes) -> TransferSummary:
        return self.finish(self._post(op, legs, local_ids, num_tokens, notif))

    def _post(self, op: Op, legs: list[Leg], local_ids: np.ndarray, num_tokens: int, notif: bytes) -> Posted:
        started = time.perf_counter()
        return Posted(op, legs, self._post_all(self._make_all(op, legs, local_ids, num_tokens, notif)), started)

    def _make(self, op: Op, leg: Leg, local_ids: np.ndarray, num_tokens: int, notif: bytes) -> Transfer:
        prepared = self.peers.prepared(leg.peer, leg.heads)
        if prepared.local is not None and prepared.remote is not None and prepared.indexer is not None:
            local_idx, remote_idx = prepared.indexer.indices(local_ids, leg.remote_ids, num_tokens)
            return self.agent.make(op, prepared.local, local_idx, prepared.remote, remote_idx, notif=notif)
        spans = request_spans(prepared.plan, local_ids, leg.remote_ids, num_tokens)
        return self.agent.make_spans(op, spans.local, spans.remote, peer=leg.peer.agent_name,
                                     local_mem=self.mem, remote_mem=leg.peer.mem, notif=notif)

    def _make_all(self, op: Op, legs: list[Leg], local_ids: np.ndarray, num_tokens: int,
                  notif: bytes) -> list[Transfer]:
        made: list[Transfer] = []
        try:
            for leg in legs:
                made.append(self._make(op, leg, local_ids, num_tokens, notif))
        except KvxferError:
            for xfer in made:
                xfer.release()
            raise
        return made

    def _post_all(self, made: list[Transfer]) -> list[Transfer]:
        """Post every leg (all made first: a request whose last leg cannot be planned posts
        nothing). A post NIXL refuses gives up the legs already posted, as a landing."""
        for i, xfer in enumerate(made):
            try:
                self.agent.start(xfer)
            except TransferError as err:
                for unposted in made[i + 1:]:
                    unposted.release()
                self.agent.abandon(made[:i], err)
                raise
        return made

    # ---- staged (gather, one descriptor, scatter) ------------------------------------------------

    def stage_write(self, leg: Leg, local_ids: np.ndarray, num_tokens: int, remote_offset: int) -> Staged:
        """Our part of `leg` gathered into a slot of ours (enqueued: `post_staged` waits for it),
        bound for `remote_offset` in the peer's slots area (refused if it reaches outside). Waits
        up to the transfer's deadline for a free slot."""
        remote = leg.peer.info.staging
        if self.staging is None or remote is None:
            raise ConfigError(f"staged write to {leg.peer.engine_id}/{leg.peer.rank}: staging is off on "
                              f"{'this rank' if self.staging is None else 'the peer'}")
        self._reclaim_slots()
        plan = self.peers.plan(leg.peer, leg.heads)
        part = self.staging.parts(_gather_key(leg), [plan], local_ids, num_tokens, self.tensors, to_slot=True)
        return stage_part(self.staging, part, remote=remote, remote_offset=remote_offset,
                          wait_s=self.deadline.seconds(sum(part.sizes)))

    def post_staged(self, staged: Staged, leg: Leg, *, notif: bytes) -> Posted:
        """WRITE a staged part with one descriptor once its gather ended (`landed`, `finish`:
        the slot is ours again once it ends). A post NIXL refuses frees the slot and raises."""
        started = time.perf_counter()
        try:
            xfer = post_part(self.agent, staged, peer_agent=leg.peer.agent_name, local_mem=self.staging.mem,
                             notif=notif)
        except BaseException:
            self.staging.pool.release(staged.slot)
            raise
        return Posted(Op.WRITE, [leg], [xfer], started, slots=(staged.slot,))

    @property
    def free_staging_slots(self) -> int:
        """Staging slots of ours free now (0 without staging)."""
        if self.staging is None or self.staging.pool is None:
            return 0
        self._reclaim_slots()
        return self.staging.pool.num_free

    def unstage(self, staged: Staged) -> None:
        """A staged part that will not be posted: its slot back."""
        self.staging.pool.release(staged.slot)

    def staged_parts(self, legs: list[Leg], local_ids: np.ndarray, num_tokens: int) -> Parts | None:
        """Every leg's part of a request as this side scatters it (None: staging is off here or
        at a peer). Needs the peer table; `reserve` then waits for a slot without it."""
        if self.staging is None or any(leg.peer.info.staging is None for leg in legs):
            return None
        plans = [self.peers.plan(leg.peer, leg.heads) for leg in legs]
        return self.staging.parts(_scatter_key(legs), plans, local_ids, num_tokens, self.tensors, to_slot=False)

    def warm_staging(self, legs: list[Leg], *, to_slot: bool) -> float:
        """Build the GPU copier of a staged transfer with these legs ahead of its first request
        (compiled or loaded by Triton, its graph captured): the producer's gather of each leg
        (`to_slot`), or the consumer's scatter of all of them. Returns the seconds it took (0:
        nothing to build, staging is torch indexing here or off on a side)."""
        if self.staging is None or any(leg.peer.info.staging is None for leg in legs):
            return 0.0
        started = time.perf_counter()
        if to_slot:
            built = [self.staging.warm(_gather_key(leg), [self.peers.plan(leg.peer, leg.heads)], self.tensors,
                                       to_slot=True) for leg in legs]
        else:
            plans = [self.peers.plan(leg.peer, leg.heads) for leg in legs]
            built = [self.staging.warm(_scatter_key(legs), plans, self.tensors, to_slot=False)]
        return time.perf_counter() - started if any(built) else 0.0

    def _free_slots(self, posted: Posted, landing: Landing | None) -> None:
        """The slots `posted` read from, back to the pool: now, or (a failed transfer given up
        while still running) once it has ended, so a late read never sends another request's
        bytes (`_reclaim_slots`)."""
        for slot in posted.slots:
            if landing is None or landing.settled():
                self.staging.pool.release(slot)
            else:
                self._unsettled.append((landing, slot))

    def _reclaim_slots(self) -> None:
        """Slots of failed WRITEs whose given-up transfers have ended, back to the pool (polled,
        like every transfer, under the agent's lock: the callers hold it)."""
        still = []
        for landing, slot in self._unsettled:
            if landing.settled():
                self.staging.pool.release(slot)
            else:
                still.append((landing, slot))
        self._unsettled = still

    def reserve(self, parts: Parts) -> Reservation | None:
        """A staging slot holding `parts` back to back, waiting for one up to the transfer
        deadline (None: the request does not fit a slot; move it directly)."""
        return reserve(self.staging, parts, timeout_s=self.deadline.seconds(sum(parts.sizes)))

    def calibrate(self, peer: Peer) -> FabricCosts | None:
        """Probe transfers between our staging probe area and the peer's (None if either has
        none): the numbers the cost model needs, on this fabric, for this peer."""
        remote = peer.info.staging
        if self.staging is None or remote is None:
            return None
        size = min(PROBE_BYTES, remote.probe_bytes)
        probe = Probe(self.staging.probe.data_ptr(), remote.probe_addr, device_id(self.staging.probe),
                      remote.device_id, self.staging.mem, remote.memory, peer.agent_name)
        return calibrate(self.agent, probe, self.staging.device, probe_bytes=size, small_bytes=SMALL_PROBE_BYTES,
                         num_small=num_small_probes(size, most=512))

    def close(self) -> None:
        self.peers.close()
        self.agent.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gather_key(leg: Leg) -> tuple:
    return ("gather", leg.peer.engine_id, leg.peer.boot_epoch, leg.peer.rank, leg.heads)


def _scatter_key(legs: list[Leg]) -> tuple:
    return ("scatter", *((leg.peer.engine_id, leg.peer.boot_epoch, leg.peer.rank, leg.heads) for leg in legs))


def shaped_ids(desc: CacheDesc, block_ids: Sequence[int] | np.ndarray, num_tokens: int, *,
               skip_blocks: int = 0) -> np.ndarray:
    """The blocks holding a request's `num_tokens` tokens after `skip_blocks`, shaped as the
    layout indexes them: `[n]`, or `[2, n]` (K pages, V pages) for separate K/V pages."""
    ids = np.asarray(block_ids, dtype=np.int64)
    pages = slice(skip_blocks, skip_blocks + -(-num_tokens // desc.block_size))
    return ids.reshape(2, -1)[:, pages] if desc.separate_kv_pages else ids[pages]


__all__ = ["DeadlinePolicy", "Endpoint", "Identity", "Leg", "Posted", "TransferError", "TransferSummary", "shaped_ids"]
