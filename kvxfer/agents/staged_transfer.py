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
from dataclasses import dataclass

import numpy as np
import torch

from kvxfer.agents import messages as m
from kvxfer.agents import unit_copy
from kvxfer.agents.nixl_agent import NixlAgent, Op, XferStats, device_id
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
            return torch_parts(plans, local_ids, num_tokens, tensors, to_slot=to_slot)
        ids = copier.check(local_ids, num_tokens)  # bad ids refused now, not once the data has landed
        size = copier.part_bytes(num_tokens)

        def copy(slot: Slot, offsets: list[int]) -> None:
            base = self.offset_of(slot)
            copier.stage(ids, num_tokens, [base + o for o in offsets])
            copier.run()

        return Parts([size] * len(plans), copy)

    def warm(self, key: tuple, plans: list[PairPlan], tensors: list[torch.Tensor], *, to_slot: bool) -> bool:
        """Build the copier `parts` will use for `key` and capture its graph, ahead of the first
        request. False where torch indexing serves (no CUDA, Triton or pool): nothing to build."""
        copier = self._copier(key, plans, tensors, to_slot=to_slot)
        if copier is None:
            return False
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
                copier = UnitCopier(plans, 0, tensors, self.pool.buffer.view(-1), max_tokens=max_tokens,
                                    to_slot=to_slot)
            except Exception:  # Triton cannot compile here (no compiler in the image, ...): torch still can
                log.warning("staging: no unit copier for %s; copying with torch indexing", key, exc_info=True)
        self._copiers[key] = copier
        while len(self._copiers) > MAX_COPIERS:
            self._copiers.popitem(last=False)
        return copier


@dataclass(frozen=True)
class Parts:
    """One request's parts as one side copies them: their sizes in bytes, and the copy of
    every part between the cache and a slot, each at its offset in it."""

    sizes: list[int]
    copy: Callable[[Slot, list[int]], None]


def torch_parts(plans: list[PairPlan], local_ids: np.ndarray, num_tokens: int, tensors: list[torch.Tensor], *,
                to_slot: bool) -> Parts:
    """`Parts` by torch indexing (`staging.Gather`): CPU, or where no unit copier serves."""
    gathers = [build_gather(p, local_ids, num_tokens, tensors) for p in plans]
    sizes = [g.bytes_per_layer * len(tensors) for g in gathers]

    def copy(slot: Slot, offsets: list[int]) -> None:
        for gather, offset, size in zip(gathers, offsets, sizes, strict=True):
            view = slot.tensor[offset : offset + size]
            if to_slot:
                gather.gather(tensors, view)
            else:
                gather.scatter(view, tensors)

    return Parts(sizes, copy)


def build_gather(plan: PairPlan, local_ids: np.ndarray, num_tokens: int, tensors: list[torch.Tensor]) -> Gather:
    """This side's units of one peer's part of a request (the plan's local side)."""
    offsets = layer_offsets(plan, 0, local_ids, num_tokens)
    return Gather.build(offsets, plan.unit_bytes, tensors[0].nbytes, tensors[0].device)


def send_part(agent: NixlAgent, area: StagingArea, part: Parts, *, peer_agent: str, remote: m.StagingInfo,
              remote_offset: int, notif: bytes, timeout_s: float) -> tuple[int, XferStats]:
    """Gather `part` (one) into a slot of ours, WRITE it with one descriptor to `remote_offset`
    in the peer's slots area (refused if it would reach outside), wait, free the slot. Returns
    the bytes."""
    if len(part.sizes) != 1:
        raise PlanError(f"staged write: one part per WRITE, got {len(part.sizes)}")
    (num_bytes,) = part.sizes
    if remote_offset + num_bytes > remote.slots_bytes:
        raise PlanError(f"staged write: offset {remote_offset} + {num_bytes} bytes reaches past the peer's "
                        f"staging slots ({remote.slots_bytes} bytes); refusing")
    if area.pool is None:
        raise ConfigError("staged write: this rank has no staging slots (--staging-mib 0)")
    slot = area.pool.acquire(num_bytes, timeout_s=timeout_s)
    try:
        part.copy(slot, [0])
        if area.device.type == "cuda":
            torch.cuda.synchronize(area.device)
        local = np.array([[slot.address, num_bytes, device_id(slot.tensor)]], dtype=np.uint64)
        target = np.array([[remote.slots_addr + remote_offset, num_bytes, remote.device_id]], dtype=np.uint64)
        xfer = agent.post_spans(Op.WRITE, local, target, peer=peer_agent, local_mem=area.mem,
                                remote_mem=remote.memory, notif=notif)
        stats = agent.wait([xfer], timeout_s=timeout_s)[0]
    finally:
        area.pool.release(slot)
    return num_bytes, stats


@dataclass
class Reservation:
    """A consumer's slot for one request: each source's part at its offset, in source order."""

    slot: Slot
    parts: Parts
    offsets: list[int]  # in the slot
    base: int  # the slot's offset in the slots area

    def wire_offsets(self) -> list[int]:
        """Where each source writes, in the consumer's slots area (what WriteRequest carries)."""
        return [self.base + o for o in self.offsets]

    def scatter(self) -> None:
        """Every part into the cache (the parts know which)."""
        self.parts.copy(self.slot, self.offsets)
        if self.slot.tensor.device.type == "cuda":
            torch.cuda.synchronize(self.slot.tensor.device)


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
