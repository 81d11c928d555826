"""Staged WRITEs between the daemons' endpoints: the producer gathers one peer's part of a
request into a slot of its own staging pool, moves it with one descriptor into a slot the
consumer reserved, and the consumer scatters it into its blocks once notified. On CUDA both
copies are unit copiers (`unit_copy`), kept per pairing; elsewhere torch indexing.

Each rank registers one staging area with NIXL at start-up: a probe area that calibration
transfers may read and write (it never holds data), and a pool of slots. A consumer reserves a
slot per request (waiting for one up to a deadline, back-pressure) and hands out offsets into
its slots area; a producer refuses any offset that would reach outside that area. A reservation
whose transfer failed goes back to the pool only after the transfer deadline, so a late write
from the producer can never land in another request's slot.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from kvxfer.agents import messages as m
from kvxfer.agents import unit_copy
from kvxfer.agents.nixl_agent import NixlAgent, Op, Transfer, device_id
from kvxfer.agents.staging import Gather, Slot, StagingPool
from kvxfer.agents.unit_copy import UnitCopier
from kvxfer.errors import ConfigError, PlanError
from kvxfer.planning import PairPlan, layer_offsets

log = logging.getLogger(__name__)
PROBE_BYTES = 8 << 20
MAX_COPIERS = 32  # unit copiers kept per rank (pairings seen most recently)


SLOT_ALIGN = 4096  # every staging slot starts on a page: the GPU copies move 16-byte vectors


@dataclass(frozen=True)
class StagingConfig:
    slot_bytes: int = 0  # 0: only the probe area (calibration), no staged transfers
    num_slots: int = 0
    max_tokens: int = 0  # the longest request (the model's context); 0: as many as a slot holds


class StagingArea:
    """One rank's staging memory, next to its cache (same device), registered once."""

    def __init__(self, agent: NixlAgent, config: StagingConfig, device: torch.device) -> None:
        self.probe = torch.zeros(PROBE_BYTES, dtype=torch.uint8, device=device)
        self.pool = StagingPool(slot_bytes=config.slot_bytes, num_slots=config.num_slots, device=device) \
            if config.slot_bytes and config.num_slots else None
        self.device = device
        # Staged copies run on a stream of their own, never queued behind compute the engine left
        # on the default stream: a request's KV is final before it is staged (prefill returned its
        # token), and decode reads a scatter's blocks only after the host saw it end.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.max_tokens = config.max_tokens
        self.mem = agent.register([self.probe] + ([self.pool.buffer] if self.pool else []))
        self._copiers: OrderedDict[tuple, UnitCopier | None] = OrderedDict()

    def info(self) -> m.StagingInfo:
        slots = self.pool.buffer if self.pool else self.probe[:0]
        return m.StagingInfo(probe_addr=self.probe.data_ptr(), probe_bytes=self.probe.numel(),
                             slots_addr=slots.data_ptr(), slots_bytes=slots.numel(),
                             device_id=device_id(self.probe), memory=self.mem)

    def offset_of(self, slot: Slot) -> int:
        return slot.address - self.pool.buffer.data_ptr()

    def parts(self, key: tuple, plans: list[PairPlan], local_ids: np.ndarray, num_tokens: int,
              tensors: list[torch.Tensor], *, to_slot: bool) -> Parts:
        """One request's parts for these pairings (the plans' local side), as this rank copies
        them between its cache and a slot: with the unit copier kept for `key` on CUDA (one
        kernel, graph-replayed), else with torch indexing."""
        copier = self._copier(key, plans, tensors, to_slot=to_slot)
        if copier is None or not copier.fits(num_tokens):
            with self.on_stream():  # the index tensors' uploads queue where the copies run
                parts = torch_parts(plans, local_ids, num_tokens, tensors, to_slot=to_slot)
            return Parts(parts.sizes, self._enqueued(parts.copy))
        ids = copier.check(local_ids, num_tokens)  # bad ids refused now, not once the data has landed
        size = copier.part_bytes(num_tokens)

        def copy(slot: Slot, offsets: list[int]) -> None:
            base = self.offset_of(slot)
            copier.stage(ids, num_tokens, [base + o for o in offsets])
            copier.run()

        return Parts([size] * len(plans), self._enqueued(copy))

    def on_stream(self) -> AbstractContextManager:
        """This area's copy stream made current (nothing on CPU)."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def _enqueued(self, copy: Callable[[Slot, list[int]], None]) -> Callable[[Slot, list[int]], Copied]:
        """`copy` run on this area's stream, returning the event that marks its end there."""
        stream = self.stream

        def enqueued(slot: Slot, offsets: list[int]) -> Copied:
            if stream is None:
                copy(slot, offsets)
                return Copied(None)
            with torch.cuda.stream(stream):
                copy(slot, offsets)
                ended = torch.cuda.Event()
                ended.record(stream)
            return Copied(ended)

        return enqueued

    def warm(self, key: tuple, plans: list[PairPlan], tensors: list[torch.Tensor], *, to_slot: bool) -> bool:
        """Build the copier `parts` will use for `key` and capture its graph, ahead of the first
        request. False where torch indexing serves (no CUDA, Triton or pool): nothing to build."""
        copier = self._copier(key, plans, tensors, to_slot=to_slot)
        if copier is None:
            return False
        with self.on_stream():
            copier.warm()
        return True

    def _copier(self, key: tuple, plans: list[PairPlan], tensors: list[torch.Tensor], *,
                to_slot: bool) -> UnitCopier | None:
        """Built on first use of `key` (Triton compiles once per shape, then loads from its
        disk cache) and kept for the most recent MAX_COPIERS keys; None where torch serves."""
        if self.pool is None or not unit_copy.available(self.device):
            return None
        if key in self._copiers:
            self._copiers.move_to_end(key)
            return self._copiers[key]
        plan = plans[0]
        chunk_bytes = plan.spans_per_chunk * plan.unit_bytes * len(tensors)
        max_tokens = self.pool.slot_bytes // chunk_bytes * plan.chunk_tokens
        if self.max_tokens:
            max_tokens = min(max_tokens, -(-self.max_tokens // plan.chunk_tokens) * plan.chunk_tokens)
        copier = None
        if max_tokens > 0 and unit_copy.can_share(plans, 0, max_tokens):
            log.info("staging: unit copier for %s (%d part(s), up to %d tokens)", key, len(plans), max_tokens)
            try:
                with self.on_stream():  # its buffers' uploads and first run, where its copies will run
                    copier = UnitCopier(plans, 0, tensors, self.pool.buffer.view(-1), max_tokens=max_tokens,
                                        to_slot=to_slot)
                self._drain()
            except Exception:  # Triton cannot compile here (no compiler in the image, ...): torch still can
                log.warning("staging: no unit copier for %s; copying with torch indexing", key, exc_info=True)
        self._copiers[key] = copier
        if len(self._copiers) > MAX_COPIERS:
            self._drain()  # no queued copy still uses the copiers' buffers
            while len(self._copiers) > MAX_COPIERS:
                self._copiers.popitem(last=False)
        return copier

    def _drain(self) -> None:
        """Wait for every copy queued on this area's stream."""
        if self.stream is not None:
            self.stream.synchronize()


@dataclass(frozen=True)
class Copied:
    """A staged copy, enqueued: `ended` marks its end on its area's stream (None: it ran
    synchronously, on CPU)."""

    ended: torch.cuda.Event | None

    def wait(self) -> None:
        if self.ended is not None:
            self.ended.synchronize()


@dataclass(frozen=True)
class Parts:
    """One request's parts as one side copies them: their sizes in bytes, and the copy of
    every part between the cache and a slot, each at its offset in it (enqueued on the area's
    stream: `Copied.wait` before the slot's bytes are used)."""

    sizes: list[int]
    copy: Callable[[Slot, list[int]], Copied]


def torch_parts(plans: list[PairPlan], local_ids: np.ndarray, num_tokens: int, tensors: list[torch.Tensor], *,
                to_slot: bool) -> Parts:
    """`Parts` by torch indexing (`staging.Gather`): CPU, or where no unit copier serves."""
    gathers = [build_gather(p, local_ids, num_tokens, tensors) for p in plans]
    sizes = [g.bytes_per_layer * len(tensors) for g in gathers]

    def copy(slot: Slot, offsets: list[int]) -> Copied:
        for gather, offset, size in zip(gathers, offsets, sizes, strict=True):
            view = slot.tensor[offset : offset + size]
            if to_slot:
                gather.gather(tensors, view)
            else:
                gather.scatter(view, tensors)
        return Copied(None)

    return Parts(sizes, copy)


def build_gather(plan: PairPlan, local_ids: np.ndarray, num_tokens: int, tensors: list[torch.Tensor]) -> Gather:
    """This side's units of one peer's part of a request (the plan's local side)."""
    offsets = layer_offsets(plan, 0, local_ids, num_tokens)
    return Gather.build(offsets, plan.unit_bytes, tensors[0].nbytes, tensors[0].device)


@dataclass(frozen=True)
class Staged:
    """One part gathered into a slot of ours for one WRITE (the gather perhaps still running on
    the staging stream), and where in the peer's slots area it goes."""

    slot: Slot
    num_bytes: int
    gathered: Copied
    remote_addr: int
    remote: m.StagingInfo


def stage_part(area: StagingArea, part: Parts, *, remote: m.StagingInfo, remote_offset: int,
               wait_s: float) -> Staged:
    """Check `part` (one) against the peer's registered slots area, take a slot of ours (waiting
    up to `wait_s` for one) and enqueue the gather into it. Several requests' gathers queue back
    to back on the staging stream while earlier WRITEs run."""
    if len(part.sizes) != 1:
        raise PlanError(f"staged write: one part per WRITE, got {len(part.sizes)}")
    (num_bytes,) = part.sizes
    if remote_offset < 0 or remote_offset + num_bytes > remote.slots_bytes:
        raise PlanError(f"staged write: offset {remote_offset} + {num_bytes} bytes reaches outside the peer's "
                        f"staging slots ({remote.slots_bytes} bytes); refusing")
    if area.pool is None:
        raise ConfigError("staged write: this rank has no staging slots (--staging-mib 0)")
    slot = area.pool.acquire(num_bytes, timeout_s=wait_s)
    try:
        gathered = part.copy(slot, [0])
    except BaseException:
        area.pool.release(slot)
        raise
    return Staged(slot, num_bytes, gathered, remote.slots_addr + remote_offset, remote)


def post_part(agent: NixlAgent, staged: Staged, *, peer_agent: str, local_mem: m.MemoryKind,
              notif: bytes) -> Transfer:
    """WRITE a staged part with one descriptor, once its gather ended (the host waits for that
    copy alone, not for the device)."""
    staged.gathered.wait()
    local = np.array([[staged.slot.address, staged.num_bytes, device_id(staged.slot.tensor)]], dtype=np.uint64)
    target = np.array([[staged.remote_addr, staged.num_bytes, staged.remote.device_id]], dtype=np.uint64)
    return agent.post_spans(Op.WRITE, local, target, peer=peer_agent, local_mem=local_mem,
                            remote_mem=staged.remote.memory, notif=notif)


@dataclass
class Reservation:
    """A consumer's slot for one request: each source's part at its offset, in source order."""

    slot: Slot
    parts: Parts
    offsets: list[int]  # in the slot
    base: int  # the slot's offset in the slots area

    def wire_offsets(self) -> list[int]:
        """Where each source writes, in the consumer's slots area (what `PushAsk` carries)."""
        return [self.base + o for o in self.offsets]

    def scatter(self) -> None:
        """Every part into the cache (the parts know which), returning once it is there."""
        self.parts.copy(self.slot, self.offsets).wait()


def reserve(area: StagingArea, parts: Parts, *, timeout_s: float) -> Reservation | None:
    """A slot holding every part back to back, or None when this rank cannot stage the request
    (no pool, or the request is larger than a slot): the caller moves it directly instead."""
    total = sum(parts.sizes)
    if area.pool is None or total > area.pool.slot_bytes:
        return None
    slot = area.pool.acquire(total, timeout_s=timeout_s)
    offsets = [int(x) for x in np.cumsum([0, *parts.sizes[:-1]])]
    return Reservation(slot, parts, offsets, area.offset_of(slot))


def release_later(area: StagingArea, reservation: Reservation, delay_s: float) -> None:
    """Give a failed request's slot back once no late write can still land in it."""
    timer = threading.Timer(delay_s, area.pool.release, args=(reservation.slot,))
    timer.daemon = True
    timer.start()
