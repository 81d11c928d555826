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

import numpy as np
import torch

from kvxfer.agents.nixl_agent import MemKind, NixlAgent, Op, Transfer
from kvxfer.agents.staging import Gather
from kvxfer.bench.cache import RankCache
from kvxfer.bench.config import BenchConfig
from kvxfer.bench.messages import Hello
from kvxfer.errors import ConfigError
from kvxfer.layouts import DTYPE_BYTES, CacheRegion, get_layout
from kvxfer.planning import Assignment, Fallback, map_tp, pair, request_layer_offsets


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


def build_parts(cfg: BenchConfig, cache: RankCache, hellos: list[Hello], device: torch.device) -> list[Part]:
    """This rank's parts for one request: gather (prefill) or scatter (decode) indices."""
    by_key = {(h.role, h.rank): h for h in hellos}
    sender = cache.role == "prefill"
    parts = []
    for a, offset in my_parts(cfg, cache.role, cache.rank):
        peer = by_key[("decode", a.decode_rank) if sender else ("prefill", a.prefill_rank)]
        remote = CacheRegion(peer.desc, np.array(peer.layer_addrs, dtype=np.uint64), peer.device_id)
        plan = pair(cache.region, remote, a.heads, fallback=Fallback(cfg.fallback))
        remote_ids = np.array(peer.block_ids, dtype=np.int64)
        if remote.desc.separate_kv_pages:
            remote_ids = remote_ids.reshape(2, -1)
        local_off, _ = request_layer_offsets(plan, cache.block_ids, remote_ids, cfg.tokens)
        gather = Gather.build(local_off, plan.unit_bytes, cache.desc.layer_bytes, device)
        num_bytes = gather.bytes_per_layer * cfg.layers
        if num_bytes != part_bytes(cfg, a):
            raise ConfigError(f"bench staged: part {a} has {num_bytes} bytes, expected {part_bytes(cfg, a)}")
        parts.append(Part(peer, gather, offset, offset_at_receiver(cfg, a) if sender else offset, num_bytes))
    return parts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def send(agent: NixlAgent, cache: RankCache, parts: list[Part], staging: torch.Tensor, *,
         notif: bytes) -> list[Transfer]:
    """Gather every part, then one WRITE per part (one descriptor each)."""
    for p in parts:
        p.gather.gather(cache.tensors, staging[p.local_offset : p.local_offset + p.num_bytes])
    _sync(staging.device)
    mem = MemKind.of(staging)
    base = staging.data_ptr()
    transfers = []
    for p in parts:
        local = np.array([[base + p.local_offset, p.num_bytes, cache.region.device_id]], dtype=np.uint64)
        remote = np.array([[p.peer.staging_addr + p.remote_offset, p.num_bytes, p.peer.device_id]],
                          dtype=np.uint64)
        transfers.append(agent.post_spans(Op.WRITE, local, remote, peer=p.peer.agent, local_mem=mem,
                                          remote_mem=MemKind(p.peer.mem), notif=notif))
    return transfers


def receive(agent: NixlAgent, cache: RankCache, parts: list[Part], staging: torch.Tensor, *,
            timeout_s: float) -> int:
    """Wait for every part's notification, scatter them all; returns the end time (ns)."""
    agent.wait_notifs(len(parts), timeout_s=timeout_s)
    for p in parts:
        p.gather.scatter(staging[p.local_offset : p.local_offset + p.num_bytes], cache.tensors)
    _sync(staging.device)
    return time.monotonic_ns()
