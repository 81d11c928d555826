"""Staged transfers in `kvxfer bench`: the prefill rank gathers each decode rank's heads (all
layers) into a contiguous part of its registered staging buffer, WRITEs each part with one
descriptor into the decode rank's staging buffer, and the decode rank scatters it into its
cache once the notification arrives. Timed from the first gather to the last scatter.

Slot layout, agreed by both sides from the TP mapping alone: a prefill rank's buffer holds its
targets in `targets_of` order; a decode rank's buffer holds its sources in `sources_of` order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from kvxfer.agents import unit_copy
from kvxfer.agents.nixl_agent import MemKind, NixlAgent, Op, Transfer
from kvxfer.agents.staged_transfer import build_gather
from kvxfer.agents.staging import Gather
from kvxfer.agents.unit_copy import UnitCopier
from kvxfer.bench.cache import RankCache
from kvxfer.bench.config import BenchConfig
from kvxfer.bench.messages import Hello
from kvxfer.errors import ConfigError, TransferTimeout
from kvxfer.layouts import DTYPE_BYTES, CacheRegion, get_layout
from kvxfer.planning import Assignment, Fallback, PairPlan, map_tp, pair


def part_bytes(cfg: BenchConfig, assignment: Assignment) -> int:
    """Bytes of one (prefill rank, decode rank) part: whole chunks of gcd(block sizes) tokens."""
    chunk = math.gcd(cfg.prefill_block_size, cfg.decode_block_size)
    padded = -(-cfg.tokens // chunk) * chunk
    num_kv = 2 if get_layout(cfg.prefill_layout).has_v else 1
    return padded * assignment.heads.size * cfg.head_dim * DTYPE_BYTES[cfg.dtype] * num_kv * cfg.layers


def my_parts(cfg: BenchConfig, role: str, rank: int) -> list[tuple[Assignment, int]]:
    """(assignment, offset in this rank's staging buffer), in slot order."""
    mapping = map_tp(cfg.kv_heads, cfg.prefill_tp, cfg.decode_tp)
    parts = mapping.targets_of(rank) if role == "prefill" else mapping.sources_of(rank)
    out, offset = [], 0
    for a in parts:
        out.append((a, offset))
        offset += part_bytes(cfg, a)
    return out


def staging_bytes(cfg: BenchConfig, role: str, rank: int) -> int:
    return sum(part_bytes(cfg, a) for a, _ in my_parts(cfg, role, rank))


def offset_at_receiver(cfg: BenchConfig, assignment: Assignment) -> int:
    for a, offset in my_parts(cfg, "decode", assignment.decode_rank):
        if a == assignment:
            return offset
    raise ConfigError(f"bench staged: {assignment} is not a source of decode rank {assignment.decode_rank}")


@dataclass(frozen=True)
class Part:
    """One request's share for one peer: `copy(layers)` gathers (prefill) or scatters (decode)
    those layers between the cache and this part of the staging buffer."""

    peer: Hello
    copy: Callable[[range], None]
    bytes_per_layer: int
    local_offset: int
    remote_offset: int
    launched: torch.cuda.Event | None = None  # sender: recorded after the first group's gather


@dataclass(frozen=True)
class PeerPair:
    """One (assignment, peer) pairing, planned once per peer like the direct path's tables;
    on CUDA with its unit copier (tables and graphs on the device)."""

    assignment: Assignment
    offset: int  # of this part in this rank's staging buffer
    remote_offset: int  # of this part in the receiver's staging buffer
    peer: Hello
    plan: PairPlan
    copier: UnitCopier | None
    copier_offsets: tuple[int, ...] = ()  # where the copier's parts start in the staging buffer


def pair_peers(cfg: BenchConfig, cache: RankCache, hellos: list[Hello], staging: torch.Tensor) -> list[PeerPair]:
    by_key = {(h.role, h.rank): h for h in hellos}
    sender = cache.role == "prefill"
    out = []
    for a, offset in my_parts(cfg, cache.role, cache.rank):
        peer = by_key[("decode", a.decode_rank) if sender else ("prefill", a.prefill_rank)]
        remote = CacheRegion(peer.desc, np.array(peer.layer_addrs, dtype=np.uint64), peer.device_id)
        plan = pair(cache.region, remote, a.heads, fallback=Fallback(cfg.fallback))
        remote_offset = offset_at_receiver(cfg, a) if sender else offset
        out.append(PeerPair(a, offset, remote_offset, peer, plan, None))
    if unit_copy.available(staging.device):
        out = _with_copiers(cfg, cache, out, staging)
    # Peers on another device first: their copy crosses a link and takes longest, so it starts
    # first and the local ones run beside it (slots keep their offsets whatever the order).
    return sorted(out, key=lambda pp: pp.peer.device_id == cache.region.device_id)


def _with_copiers(cfg: BenchConfig, cache: RankCache, pairs: list[PeerPair], staging: torch.Tensor) -> list[PeerPair]:
    """A unit copier per pair; a sender's pairs with peers on its own device share one (one
    upload and one kernel for all their head slices), as `unit_copy.can_share` allows. A
    receiver's parts arrive one by one, so each keeps its own."""
    sender = cache.role == "prefill"

    def with_copier(group: list[PeerPair]) -> list[PeerPair]:
        copier = UnitCopier([pp.plan for pp in group], 0, cache.tensors, staging, max_tokens=cfg.tokens,
                            to_slot=sender)
        offsets = tuple(pp.offset for pp in group)
        return [dataclasses.replace(pp, copier=copier, copier_offsets=offsets) for pp in group]

    local = [pp for pp in pairs if pp.peer.device_id == cache.region.device_id]
    if sender and len(local) > 1 and unit_copy.can_share([pp.plan for pp in local], 0, cfg.tokens):
        shared = dict(zip(map(id, local), with_copier(local), strict=True))
        return [shared[id(pp)] if id(pp) in shared else with_copier([pp])[0] for pp in pairs]
    return [with_copier([pp])[0] for pp in pairs]


def build_parts(cfg: BenchConfig, cache: RankCache, pairs: list[PeerPair], staging: torch.Tensor, *,
                launch: range | None = None) -> list[Part]:
    """Per request: this rank's gather (prefill) or scatter (decode) for every peer, from the
    request's block ids (uploaded for the unit copier, or indices for torch). Parts that share a
    copier share its `copy` (and its launch). `launch`: copy these layers of each part as soon
    as it is built, so that building the next part overlaps the kernel."""
    sender = cache.role == "prefill"
    parts: list[Part] = []
    loaded: dict[int, tuple[int, Callable[[range], None], torch.cuda.Event | None]] = {}
    for pp in pairs:
        key = id(pp.copier) if pp.copier is not None else id(pp)
        if key in loaded:
            per_layer, copy, launched = loaded[key]
        else:
            if pp.copier is not None:
                per_layer = pp.copier.load(cache.block_ids, cfg.tokens, pp.copier_offsets)
                copy = pp.copier.run
            else:
                part = staging[pp.offset : pp.offset + part_bytes(cfg, pp.assignment)]
                gather = build_gather(pp.plan, cache.block_ids, cfg.tokens, cache.tensors)
                per_layer = gather.bytes_per_layer
                copy = functools.partial(_torch_copy, gather, cache.tensors, part, sender)
            launched = None
            if launch is not None:
                copy(launch)
                launched = _mark(staging.device)
            loaded[key] = per_layer, copy, launched
        num_bytes = per_layer * cfg.layers
        if num_bytes != part_bytes(cfg, pp.assignment):
            raise ConfigError(f"bench staged: part {pp.assignment} has {num_bytes} bytes, "
                              f"expected {part_bytes(cfg, pp.assignment)}")
        parts.append(Part(pp.peer, copy, per_layer, pp.offset, pp.remote_offset, launched))
    return parts


def _torch_copy(gather: Gather, tensors: list[torch.Tensor], part: torch.Tensor, sender: bool, layers: range) -> None:
    slot = part[layers.start * gather.bytes_per_layer : layers.stop * gather.bytes_per_layer]
    if sender:
        gather.gather(tensors[layers.start : layers.stop], slot)
    else:
        gather.scatter(slot, tensors[layers.start : layers.stop])


# What a staged run reports, in order: indices built and (sender) gathers launched, WRITE
# handles made while the gathers run, sender's gathers finished (synchronised), WRITEs posted, WRITEs complete at the sender, last notification seen at a
# receiver, receiver's scatter finished (synchronised).
PHASES = ("indexed", "made", "gathered", "posted", "written", "notified", "scattered")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mark(device: torch.device) -> torch.cuda.Event | None:
    """An event after the work queued so far on `device` (None on CPU, where copies are done
    when they return)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def num_groups(cfg: BenchConfig, hellos: list[Hello]) -> int:
    """`--staged-groups`, or for 0: 1 when every (prefill, decode) pair shares a device (on one
    GPU every pass shares its memory, so pipelining only adds steps) and 2 when some copy crosses
    devices (the link then overlaps the gather and the scatter). Every rank derives the same
    number from the same hellos."""
    if cfg.staged_groups:
        return cfg.staged_groups
    device = {(h.role, h.rank): h.device_id for h in hellos}
    crosses = any(device["prefill", a.prefill_rank] != device["decode", a.decode_rank]
                  for a in map_tp(cfg.kv_heads, cfg.prefill_tp, cfg.decode_tp).assignments)
    return 2 if crosses else 1


def groups(num_layers: int, num_groups: int) -> list[range]:
    """Layer ranges moved as separate WRITEs, so the receiver scatters one while the next is on
    the wire and the sender gathers the one after (a three-stage pipeline)."""
    n = max(1, min(num_groups, num_layers))
    bounds = [round(i * num_layers / n) for i in range(n + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(n)]


def send(agent: NixlAgent, cache: RankCache, parts: list[Part], staging: torch.Tensor, *,
         layer_groups: list[range], rank: int, phases: dict[str, int]) -> list[Transfer]:
    """Per layer group: gather every part (the first group's gathers were launched by
    `build_parts`), make each WRITE's handle (one descriptor) while the kernels run, then post
    each WRITE as soon as its own gather is done. Records when that finished in `phases`."""
    mem, base = MemKind.of(staging), staging.data_ptr()
    transfers = []
    for g, layers in enumerate(layer_groups):
        ready = [p.launched for p in parts]
        if g:
            marks: dict[int, torch.cuda.Event | None] = {}
            for p in parts:  # parts sharing a copier share its copy
                if id(p.copy) not in marks:
                    p.copy(layers)
                    marks[id(p.copy)] = _mark(staging.device)
            ready = [marks[id(p.copy)] for p in parts]
        made = []
        for p in parts:
            lo, hi = _group_span(p, layers)
            local = np.array([[base + p.local_offset + lo, hi - lo, cache.region.device_id]], dtype=np.uint64)
            remote = np.array([[p.peer.staging_addr + p.remote_offset + lo, hi - lo, p.peer.device_id]],
                              dtype=np.uint64)
            made.append(agent.make_spans(Op.WRITE, local, remote, peer=p.peer.agent, local_mem=mem,
                                         remote_mem=MemKind(p.peer.mem), notif=_NOTIF.encode((rank, g))))
        phases["made"] = time.monotonic_ns()
        for i in range(len(parts)):
            if ready[i] is not None:
                ready[i].synchronize()  # this part's gather is done; the next may still run
            phases["gathered"] = time.monotonic_ns()
            transfers.append(agent.start(made[i]))
            phases["posted"] = time.monotonic_ns()
    return transfers


def receive(agent: NixlAgent, cache: RankCache, parts: list[Part], staging: torch.Tensor, *,
            layer_groups: list[range], timeout_s: float, phases: dict[str, int]) -> int:
    """Scatter each (part, layer group) as its notification arrives; returns the end time (ns).
    Records when the last notification arrived in `phases`."""
    by_rank = {p.peer.rank: p for p in parts}
    pending = {(r, g) for r in by_rank for g in range(len(layer_groups))}
    deadline = time.monotonic() + timeout_s
    while pending:
        arrived = [_NOTIF_DECODER.decode(payload) for _, payload in agent.collect_notifs()]
        if arrived:
            phases["notified"] = time.monotonic_ns()
        for rank, g in arrived:
            by_rank[rank].copy(layer_groups[g])
            pending.discard((rank, g))
        if pending and time.monotonic() > deadline:
            raise TransferTimeout(f"bench staged: parts {sorted(pending)} not delivered in {timeout_s:.1f} s")
    _sync(staging.device)
    return time.monotonic_ns()


def _group_span(p: Part, layers: range) -> tuple[int, int]:
    return layers.start * p.bytes_per_layer, layers.stop * p.bytes_per_layer


_NOTIF = msgspec.msgpack.Encoder()
_NOTIF_DECODER = msgspec.msgpack.Decoder(tuple[int, int])  # (prefill rank, layer group)
