"""What one bench rank moves per request, and the direct run, through the production
`Endpoint`. READ: decode ranks pull from the prefill ranks they read from (`Endpoint.read`).
WRITE: prefill ranks push into the decode ranks they feed (`Endpoint.write`). SPLIT: both at
once, decode reading the request's first blocks and prefill writing the rest.

`PlanKind.SPANS` and `PlanKind.PER_BLOCK` are baselines production does not run (explicit
spans per request; one descriptor per block unit): they post through the endpoint's own agent,
pairings and deadline, with the spans `planning.request_spans` gives.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from kvxfer.agents.endpoint import Endpoint, Leg, shaped_ids
from kvxfer.agents.messages import Role
from kvxfer.agents.nixl_agent import Op
from kvxfer.agents.peers import Peer
from kvxfer.bench.cache import RankCache
from kvxfer.bench.config import BenchConfig, PlanKind, Strategy
from kvxfer.layouts import DTYPE_BYTES, get_layout
from kvxfer.planning import Assignment, map_tp, request_indices, request_spans


@dataclass(frozen=True)
class Share:
    """The tokens of the request one rank moves: `num_tokens` after `skip_tokens` (a block
    boundary of both sides)."""

    skip_tokens: int
    num_tokens: int


@dataclass(frozen=True)
class Remote:
    """A peer as a bench rank knows it: admitted to the endpoint's peer table, with the
    request's blocks in its cache."""

    peer: Peer
    block_ids: np.ndarray  # flat


def split_tokens(cfg: BenchConfig) -> int:
    """SPLIT: the tokens decode reads (the rest prefill writes), on a block boundary of both
    sides, as near half the request as that allows."""
    step = math.lcm(cfg.prefill_block_size, cfg.decode_block_size)
    return min(cfg.tokens, round(cfg.tokens / 2 / step) * step)


def share_of(cfg: BenchConfig, strategy: Strategy, role: Role) -> tuple[Op, Share] | None:
    """The op `role` initiates under `strategy` and on which tokens (None: it initiates nothing)."""
    if strategy is Strategy.SPLIT:
        cut = split_tokens(cfg)
        op, share = (Op.READ, Share(0, cut)) if role is Role.DECODE else (Op.WRITE, Share(cut, cfg.tokens - cut))
    elif (strategy is Strategy.READ) == (role is Role.DECODE):
        op, share = (Op.READ if strategy is Strategy.READ else Op.WRITE), Share(0, cfg.tokens)
    else:
        return None
    return (op, share) if share.num_tokens > 0 else None


def request_ids(desc_owner: Endpoint | Peer, block_ids: np.ndarray, share: Share) -> np.ndarray:
    """One side's blocks holding `share`, shaped as its layout indexes them."""
    desc = desc_owner.region.desc
    return shaped_ids(desc, block_ids, share.num_tokens, skip_blocks=share.skip_tokens // desc.block_size)


def legs_of(cfg: BenchConfig, cache: RankCache, op: Op, remotes: dict[tuple[Role, int], Remote],
            share: Share) -> list[Leg]:
    """One leg per peer this rank initiates towards for `op`, in TP-mapping order."""
    mapping = map_tp(cfg.kv_heads, cfg.prefill_tp, cfg.decode_tp)
    if op is Op.READ:
        pairs = [(remotes[Role.PREFILL, a.prefill_rank], a.heads) for a in mapping.sources_of(cache.rank)]
    else:
        pairs = [(remotes[Role.DECODE, a.decode_rank], a.heads) for a in mapping.targets_of(cache.rank)]
    return [Leg(r.peer, heads, request_ids(r.peer, r.block_ids, share)) for r, heads in pairs]


def count_direct(endpoint: Endpoint, legs: list[Leg], local_ids: np.ndarray, num_tokens: int) -> tuple[int, float]:
    """The descriptors the direct path posts for `legs` and the microseconds planning them
    took: the planning call `Endpoint.read`/`write` makes per leg, made here once more (before
    the timed run) only to count and time it."""
    started = time.perf_counter()
    num_descriptors = 0
    for leg in legs:
        prepared = endpoint.peers.prepared(leg.peer, leg.heads)
        if prepared.local is not None:
            num_descriptors += int(request_indices(prepared.plan, local_ids, leg.remote_ids, num_tokens)[0].size)
        else:
            num_descriptors += int(request_spans(prepared.plan, local_ids, leg.remote_ids, num_tokens).local.shape[0])
    return num_descriptors, (time.perf_counter() - started) * 1e6


def run_direct(endpoint: Endpoint, op: Op, legs: list[Leg], local_ids: np.ndarray, num_tokens: int, *,
               notif: bytes) -> int:
    """The daemons' direct path over every leg (`Endpoint.read` / `Endpoint.write`); the bytes."""
    if op is Op.READ:
        return endpoint.read(legs, local_ids, num_tokens).num_bytes
    return endpoint.write("bench", legs, local_ids, num_tokens, notif=notif).num_bytes


def run_baseline(endpoint: Endpoint, kind: PlanKind, op: Op, legs: list[Leg], local_ids: np.ndarray,
                 num_tokens: int, *, notif: bytes) -> tuple[int, int, float]:
    """A baseline production does not run: explicit spans per leg (coalesced for SPANS, one per
    block unit for PER_BLOCK), posted and waited for on the endpoint's agent. Returns the bytes,
    the descriptors and the microseconds planning them took."""
    t0 = time.perf_counter()
    spans = [request_spans(endpoint.peers.plan(leg.peer, leg.heads), local_ids, leg.remote_ids, num_tokens,
                           coalesce=kind is PlanKind.SPANS) for leg in legs]
    plan_us = (time.perf_counter() - t0) * 1e6
    posted = [endpoint.agent.post_spans(op, s.local, s.remote, peer=leg.peer.agent_name, local_mem=endpoint.mem,
                                        remote_mem=leg.peer.mem, notif=notif) for leg, s in zip(legs, spans, strict=True)]
    num_bytes = sum(x.num_bytes for x in posted)
    endpoint.agent.wait(posted, timeout_s=endpoint.deadline.seconds(num_bytes))
    return num_bytes, sum(x.num_descriptors for x in posted), plan_us


def part_bytes(cfg: BenchConfig, assignment: Assignment) -> int:
    """Bytes of one (prefill rank, decode rank) staged part: whole chunks of gcd(block sizes)
    tokens (what sizes the staging slots before any pairing exists)."""
    chunk = math.gcd(cfg.prefill_block_size, cfg.decode_block_size)
    padded = -(-cfg.tokens // chunk) * chunk
    num_kv = 2 if get_layout(cfg.prefill_layout).has_v else 1
    return padded * assignment.heads.size * cfg.head_dim * DTYPE_BYTES[cfg.dtype] * num_kv * cfg.layers


def staging_slots(cfg: BenchConfig, role: Role, rank: int) -> tuple[int, int]:
    """This rank's staging slots, (bytes, count): a sender one per part it sends (its pushes'
    gathers queue back to back, all in flight at once, as the producer's), a receiver one for
    every part it receives."""
    mapping = map_tp(cfg.kv_heads, cfg.prefill_tp, cfg.decode_tp)
    if role is Role.PREFILL:
        sent = [part_bytes(cfg, a) for a in mapping.targets_of(rank)]
        return max(sent, default=0), len(sent)
    return sum(part_bytes(cfg, a) for a in mapping.sources_of(rank)), 1
