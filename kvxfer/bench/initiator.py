"""The initiating side of one rank: one plan per peer, built once; per request, one posted
transfer per peer. READ: decode ranks initiate towards the prefill ranks they read from. WRITE:
prefill ranks initiate towards the decode ranks they feed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

import numpy as np

from kvxfer.agents.nixl_agent import DescList, MemKind, NixlAgent, Op, Transfer
from kvxfer.bench.cache import RankCache
from kvxfer.bench.config import BenchConfig, PlanKind
from kvxfer.bench.messages import Hello
from kvxfer.layouts import CacheRegion
from kvxfer.planning import (
    Fallback,
    PairPlan,
    descriptor_table,
    map_tp,
    pair,
    request_indices,
    request_spans,
)


@dataclass(frozen=True)
class PeerPlan:
    peer: Hello
    plan: PairPlan
    local: DescList | None  # prepared tables (PlanKind.PREPPED only)
    remote: DescList | None


class Half(Enum):
    """Which part of every peer's descriptors this rank moves (SPLIT strategy)."""

    ALL = "all"
    FIRST = "first"
    SECOND = "second"

    def of(self, rows: np.ndarray) -> np.ndarray:
        cut = rows.shape[0] // 2
        return {Half.ALL: rows, Half.FIRST: rows[:cut], Half.SECOND: rows[cut:]}[self]


@dataclass(frozen=True)
class Posted:
    transfers: list[Transfer]
    plan_us: float


def peers_for(cfg: BenchConfig, op: Op, cache: RankCache, hellos: list[Hello]) -> list[tuple[Hello, object]]:
    """(peer hello, head range) for every transfer this rank initiates for `op`."""
    mapping = map_tp(cfg.kv_heads, cfg.prefill_tp, cfg.decode_tp)
    by_key = {(h.role, h.rank): h for h in hellos}
    if op is Op.READ and cache.role == "decode":
        return [(by_key["prefill", a.prefill_rank], a.heads) for a in mapping.sources_of(cache.rank)]
    if op is Op.WRITE and cache.role == "prefill":
        return [(by_key["decode", a.decode_rank], a.heads) for a in mapping.targets_of(cache.rank)]
    return []


def build(cfg: BenchConfig, agent: NixlAgent, op: Op, kind: PlanKind, cache: RankCache,
          hellos: list[Hello]) -> list[PeerPlan]:
    """Pair with every peer and, for prepped plans, prepare both sides' tables once."""
    local_region, fallback = cache.region, Fallback(cfg.fallback)
    mem = MemKind.VRAM if cfg.device == "cuda" else MemKind.DRAM
    out = []
    for hello, heads in peers_for(cfg, op, cache, hellos):
        remote = CacheRegion(hello.desc, np.array(hello.layer_addrs, dtype=np.uint64), hello.device_id)
        plan = pair(local_region, remote, heads, fallback=fallback)
        local_list = remote_list = None
        if kind is PlanKind.PREPPED:
            local_list = agent.prepare(descriptor_table(plan, 0), mem=mem)
            remote_list = agent.prepare(descriptor_table(plan, 1), mem=MemKind(hello.mem),
                                        peer=hello.agent)
        out.append(PeerPlan(hello, plan, local_list, remote_list))
    return out


def post_all(cfg: BenchConfig, agent: NixlAgent, op: Op, kind: PlanKind, cache: RankCache,
             plans: list[PeerPlan], *, notif: bytes, half: Half = Half.ALL) -> Posted:
    """Plan the request for every peer (timed), then post one transfer per peer."""
    t0 = time.perf_counter()
    work = [tuple(half.of(side) for side in _request(cfg, kind, cache, p)) for p in plans]
    plan_us = (time.perf_counter() - t0) * 1e6
    transfers = []
    for p, (local, remote) in zip(plans, work, strict=True):
        if kind is PlanKind.PREPPED:
            transfers.append(agent.post(op, p.local, local, p.remote, remote, notif=notif))
        else:
            mem = MemKind.VRAM if cfg.device == "cuda" else MemKind.DRAM
            transfers.append(agent.post_spans(op, local, remote, peer=p.peer.agent, local_mem=mem,
                                              remote_mem=MemKind(p.peer.mem), notif=notif))
    return Posted(transfers, plan_us)


def _request(cfg: BenchConfig, kind: PlanKind, cache: RankCache, p: PeerPlan) -> tuple[np.ndarray, np.ndarray]:
    remote_ids = np.array(p.peer.block_ids, dtype=np.int64)
    if p.plan.remote.desc.separate_kv_pages:
        remote_ids = remote_ids.reshape(2, -1)
    if kind is PlanKind.PREPPED:
        return request_indices(p.plan, cache.block_ids, remote_ids, cfg.tokens)
    spans = request_spans(p.plan, cache.block_ids, remote_ids, cfg.tokens,
                          coalesce=kind is PlanKind.SPANS)
    return spans.local, spans.remote
