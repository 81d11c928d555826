"""Staged transfers in `kvxfer bench`: the prefill rank gathers each decode rank's heads (all
layers) into a contiguous part of its registered staging buffer, WRITEs each part with one
descriptor into the decode rank's staging buffer, and the decode rank scatters it into its
cache once the notification arrives. Timed from the first gather to the last scatter.

Slot layout, agreed by both sides from the TP mapping alone: a prefill rank's buffer holds its
targets in `targets_of` order; a decode rank's buffer holds its sources in `sources_of` order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from kvxfer.agents.nixl_agent import MemKind, NixlAgent, Op, Transfer
from kvxfer.agents.staging import Gather
from kvxfer.bench.cache import RankCache
from kvxfer.bench.config import BenchConfig
from kvxfer.bench.messages import Hello
from kvxfer.errors import ConfigError, TransferTimeout
from kvxfer.layouts import DTYPE_BYTES, CacheRegion, get_layout
from kvxfer.planning import Assignment, Fallback, PairPlan, map_tp, pair, request_layer_offsets


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
    peer: Hello
    gather: Gather
    local_offset: int
    remote_offset: int
    num_bytes: int


@dataclass(frozen=True)
class PeerPair:
    """One (assignment, peer) pairing, planned once per peer like the direct path's tables."""

    assignment: Assignment
    offset: int
    peer: Hello
    plan: PairPlan
    remote_ids: np.ndarray


def pair_peers(cfg: BenchConfig, cache: RankCache, hellos: list[Hello]) -> list[PeerPair]:
    by_key = {(h.role, h.rank): h for h in hellos}
    sender = cache.role == "prefill"
    out = []
    for a, offset in my_parts(cfg, cache.role, cache.rank):
        peer = by_key[("decode", a.decode_rank) if sender else ("prefill", a.prefill_rank)]
        remote = CacheRegion(peer.desc, np.array(peer.layer_addrs, dtype=np.uint64), peer.device_id)
        remote_ids = np.array(peer.block_ids, dtype=np.int64)
        if remote.desc.separate_kv_pages:
            remote_ids = remote_ids.reshape(2, -1)
        plan = pair(cache.region, remote, a.heads, fallback=Fallback(cfg.fallback))
        out.append(PeerPair(a, offset, peer, plan, remote_ids))
    return out


def build_parts(cfg: BenchConfig, cache: RankCache, pairs: list[PeerPair], device: torch.device) -> list[Part]:
    """Per request: this rank's gather (prefill) or scatter (decode) indices for every peer."""
    sender = cache.role == "prefill"
    parts = []
    for pp in pairs:
        local_off, _ = request_layer_offsets(pp.plan, cache.block_ids, pp.remote_ids, cfg.tokens)
        gather = Gather.build(local_off, pp.plan.unit_bytes, cache.desc.layer_bytes, device)
        num_bytes = gather.bytes_per_layer * cfg.layers
        if num_bytes != part_bytes(cfg, pp.assignment):
            raise ConfigError(f"bench staged: part {pp.assignment} has {num_bytes} bytes, "
                              f"expected {part_bytes(cfg, pp.assignment)}")
        remote_offset = offset_at_receiver(cfg, pp.assignment) if sender else pp.offset
        parts.append(Part(pp.peer, gather, pp.offset, remote_offset, num_bytes))
    return parts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def groups(num_layers: int, num_groups: int) -> list[range]:
    """Layer ranges moved as separate WRITEs, so the receiver scatters one while the next is on
    the wire and the sender gathers the one after (a three-stage pipeline)."""
    n = max(1, min(num_groups, num_layers))
    bounds = [round(i * num_layers / n) for i in range(n + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(n)]


def send(agent: NixlAgent, cache: RankCache, parts: list[Part], staging: torch.Tensor, *,
         num_groups: int, rank: int) -> list[Transfer]:
    """Per layer group: gather every part's layers, then one WRITE per part (one descriptor)."""
    mem, base = MemKind.of(staging), staging.data_ptr()
    transfers = []
    for g, layers in enumerate(groups(len(cache.tensors), num_groups)):
        for p in parts:
            lo, hi = _group_span(p, layers)
            p.gather.gather(cache.tensors[layers.start : layers.stop], staging[p.local_offset + lo : p.local_offset + hi])
        _sync(staging.device)
        for p in parts:
            lo, hi = _group_span(p, layers)
            local = np.array([[base + p.local_offset + lo, hi - lo, cache.region.device_id]], dtype=np.uint64)
            remote = np.array([[p.peer.staging_addr + p.remote_offset + lo, hi - lo, p.peer.device_id]],
                              dtype=np.uint64)
            transfers.append(agent.post_spans(Op.WRITE, local, remote, peer=p.peer.agent, local_mem=mem,
                                              remote_mem=MemKind(p.peer.mem), notif=_NOTIF.encode((rank, g))))
    return transfers


def receive(agent: NixlAgent, cache: RankCache, parts: list[Part], staging: torch.Tensor, *,
            num_groups: int, timeout_s: float) -> int:
    """Scatter each (part, layer group) as its notification arrives; returns the end time (ns)."""
    by_rank = {p.peer.rank: p for p in parts}
    layer_groups = groups(len(cache.tensors), num_groups)
    pending = {(r, g) for r in by_rank for g in range(len(layer_groups))}
    deadline = time.monotonic() + timeout_s
    while pending:
        arrived = [_NOTIF_DECODER.decode(payload) for _, payload in agent.collect_notifs()]
        for rank, g in arrived:
            p, layers = by_rank[rank], layer_groups[g]
            lo, hi = _group_span(p, layers)
            p.gather.scatter(staging[p.local_offset + lo : p.local_offset + hi], cache.tensors[layers.start : layers.stop])
            pending.discard((rank, g))
        if pending and time.monotonic() > deadline:
            raise TransferTimeout(f"bench staged: parts {sorted(pending)} not delivered in {timeout_s:.1f} s")
    _sync(staging.device)
    return time.monotonic_ns()


def _group_span(p: Part, layers: range) -> tuple[int, int]:
    per_layer = p.gather.bytes_per_layer
    return layers.start * per_layer, layers.stop * per_layer


_NOTIF = msgspec.msgpack.Encoder()
_NOTIF_DECODER = msgspec.msgpack.Decoder(tuple[int, int])  # (prefill rank, layer group)
