"""Staged WRITEs between the daemons' endpoints: the producer gathers one peer's part of a
request into a slot of its own staging pool, moves it with one descriptor into a slot the
consumer reserved, and the consumer scatters it into its blocks once notified.

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
from dataclasses import dataclass

import numpy as np
import torch

from kvxfer.agents import messages as m
from kvxfer.agents.nixl_agent import MemKind, NixlAgent, Op, XferStats, device_id
from kvxfer.agents.staging import Gather, Slot, StagingPool
from kvxfer.errors import ConfigError, PlanError
from kvxfer.planning import PairPlan, layer_offsets

log = logging.getLogger(__name__)
PROBE_BYTES = 8 << 20


@dataclass(frozen=True)
class StagingConfig:
    slot_bytes: int = 0  # 0: only the probe area (calibration), no staged transfers
    num_slots: int = 0


class StagingArea:
    """One rank's staging memory, next to its cache (same device), registered once."""

    def __init__(self, agent: NixlAgent, config: StagingConfig, device: torch.device) -> None:
        self.probe = torch.zeros(PROBE_BYTES, dtype=torch.uint8, device=device)
        self.pool = StagingPool(slot_bytes=config.slot_bytes, num_slots=config.num_slots, device=device) \
            if config.slot_bytes and config.num_slots else None
        self.device = device
        self.mem = agent.register([self.probe] + ([self.pool.buffer] if self.pool else []))

    def info(self) -> m.StagingInfo:
        slots = self.pool.buffer if self.pool else self.probe[:0]
        return m.StagingInfo(probe_addr=self.probe.data_ptr(), probe_bytes=self.probe.numel(),
                             slots_addr=slots.data_ptr(), slots_bytes=slots.numel(),
                             device_id=device_id(self.probe), memory=m.MemoryKind(self.mem.value))

    def offset_of(self, slot: Slot) -> int:
        return slot.address - self.pool.buffer.data_ptr()


def build_gather(plan: PairPlan, local_ids: np.ndarray, num_tokens: int, tensors: list[torch.Tensor]) -> Gather:
    """This side's units of one peer's part of a request (the plan's local side)."""
    offsets = layer_offsets(plan, 0, local_ids, num_tokens)
    return Gather.build(offsets, plan.unit_bytes, tensors[0].nbytes, tensors[0].device)


def send_part(agent: NixlAgent, area: StagingArea, tensors: list[torch.Tensor], gather: Gather, *,
              peer_agent: str, remote: m.StagingInfo, remote_offset: int, notif: bytes,
              timeout_s: float) -> tuple[int, XferStats]:
    """Gather into a slot of ours, WRITE it with one descriptor to `remote_offset` in the peer's
    slots area (refused if it would reach outside), wait, free the slot. Returns the bytes."""
    num_bytes = gather.bytes_per_layer * len(tensors)
    if remote_offset + num_bytes > remote.slots_bytes:
        raise PlanError(f"staged write: offset {remote_offset} + {num_bytes} bytes reaches past the peer's "
                        f"staging slots ({remote.slots_bytes} bytes); refusing")
    if area.pool is None:
        raise ConfigError("staged write: this rank has no staging slots (--staging-mib 0)")
    slot = area.pool.acquire(num_bytes, timeout_s=timeout_s)
    try:
        gather.gather(tensors, slot.tensor[:num_bytes])
        if area.device.type == "cuda":
            torch.cuda.synchronize(area.device)
        local = np.array([[slot.address, num_bytes, device_id(slot.tensor)]], dtype=np.uint64)
        target = np.array([[remote.slots_addr + remote_offset, num_bytes, remote.device_id]], dtype=np.uint64)
        xfer = agent.post_spans(Op.WRITE, local, target, peer=peer_agent, local_mem=area.mem,
                                remote_mem=MemKind(remote.memory.value), notif=notif)
        stats = agent.wait([xfer], timeout_s=timeout_s)[0]
    finally:
        area.pool.release(slot)
    return num_bytes, stats


@dataclass
class Reservation:
    """A consumer's slot for one request: each source's part at its offset, in source order."""

    slot: Slot
    gathers: list[Gather]
    offsets: list[int]  # in the slot
    base: int  # the slot's offset in the slots area

    def wire_offsets(self) -> list[int]:
        """Where each source writes, in the consumer's slots area (what WriteRequest carries)."""
        return [self.base + o for o in self.offsets]

    def scatter(self, tensors: list[torch.Tensor]) -> int:
        """Every part into the cache; returns the bytes."""
        total = 0
        for gather, offset in zip(self.gathers, self.offsets, strict=True):
            n = gather.bytes_per_layer * len(tensors)
            gather.scatter(self.slot.tensor[offset : offset + n], tensors)
            total += n
        if self.slot.tensor.device.type == "cuda":
            torch.cuda.synchronize(self.slot.tensor.device)
        return total


def reserve(area: StagingArea, gathers: list[Gather], num_layers: int, *, timeout_s: float) -> Reservation | None:
    """A slot holding every part back to back, or None when this rank cannot stage the request
    (no pool, or the request is larger than a slot): the caller moves it directly instead."""
    sizes = [g.bytes_per_layer * num_layers for g in gathers]
    total = sum(sizes)
    if area.pool is None or total > area.pool.slot_bytes:
        return None
    slot = area.pool.acquire(total, timeout_s=timeout_s)
    offsets = [int(x) for x in np.cumsum([0, *sizes[:-1]])]
    return Reservation(slot, gathers, offsets, area.offset_of(slot))


def release_later(area: StagingArea, reservation: Reservation, delay_s: float) -> None:
    """Give a failed request's slot back once no late write can still land in it."""
    timer = threading.Timer(delay_s, area.pool.release, args=(reservation.slot,))
    timer.daemon = True
    timer.start()
