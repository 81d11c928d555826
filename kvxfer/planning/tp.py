"""Tensor-parallel mapping: which prefill rank sends which KV heads to which decode rank.

A total, pure function of (num_kv_heads, prefill_tp, decode_tp). Works in both directions (more
prefill ranks than decode ranks and the reverse) and with GQA replication on either side (TP >
num_kv_heads: several ranks hold the same head). When prefill replicates a head, each head is
read once, and decode ranks that need the same head are spread over its replicas.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

from kvxfer.errors import PlanError


class Direction(Enum):
    SAME = "same"  # prefill_tp == decode_tp
    FAN_IN = "fan-in"  # prefill_tp > decode_tp: a decode rank gathers from several prefill ranks
    FAN_OUT = "fan-out"  # prefill_tp < decode_tp: a prefill rank feeds several decode ranks


@dataclass(frozen=True)
class HeadRange:
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"[{self.start}, {self.stop})"


@dataclass(frozen=True)
class Assignment:
    """Heads `heads` (global indices) of prefill rank `prefill_rank` go to decode rank `decode_rank`."""

    prefill_rank: int
    decode_rank: int
    heads: HeadRange


@dataclass(frozen=True)
class TPMapping:
    num_kv_heads: int
    prefill_tp: int
    decode_tp: int
    direction: Direction
    ratio: int  # max(tp) // min(tp), always >= 1
    assignments: tuple[Assignment, ...]

    def sources_of(self, decode_rank: int) -> tuple[Assignment, ...]:
        """What decode rank `decode_rank` reads (READ mode), ordered by head."""
        return tuple(a for a in self.assignments if a.decode_rank == decode_rank)

    def targets_of(self, prefill_rank: int) -> tuple[Assignment, ...]:
        """What prefill rank `prefill_rank` sends (WRITE mode), ordered by decode rank."""
        return tuple(a for a in self.assignments if a.prefill_rank == prefill_rank)


def check_tp(num_kv_heads: int, tp: int, *, field: str) -> None:
    if num_kv_heads <= 0:
        raise PlanError(f"num_kv_heads={num_kv_heads} must be positive")
    if tp <= 0:
        raise PlanError(f"{field}={tp} must be positive")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise PlanError(
            f"{field}={tp} neither divides nor is a multiple of num_kv_heads={num_kv_heads}"
        )


def heads_of_rank(num_kv_heads: int, tp: int, rank: int, *, field: str = "tp") -> HeadRange:
    """The KV heads rank `rank` holds: a contiguous slice, or one replicated head when tp > heads."""
    check_tp(num_kv_heads, tp, field=field)
    if not 0 <= rank < tp:
        raise PlanError(f"rank={rank} outside [0, {tp}) for {field}={tp}")
    if tp <= num_kv_heads:
        per_rank = num_kv_heads // tp
        return HeadRange(rank * per_rank, (rank + 1) * per_rank)
    head = rank // (tp // num_kv_heads)
    return HeadRange(head, head + 1)


def _prefill_rank_for(head: int, decode_rank: int, m: _Sizes) -> int:
    if m.prefill_tp <= m.heads:
        return head // (m.heads // m.prefill_tp)
    replicas = m.prefill_tp // m.heads
    if m.decode_tp > m.heads:
        # Decode ranks sharing this head take its prefill replicas in turn.
        nth = decode_rank - head * (m.decode_tp // m.heads)
    else:
        nth = decode_rank
    return head * replicas + nth % replicas


@dataclass(frozen=True)
class _Sizes:
    heads: int
    prefill_tp: int
    decode_tp: int


@functools.lru_cache(maxsize=64)  # pure, immutable result; asked several times per request
def map_tp(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> TPMapping:
    """Every (prefill rank, decode rank, heads) triple of a transfer; each decode head once."""
    check_tp(num_kv_heads, prefill_tp, field="prefill_tp")
    check_tp(num_kv_heads, decode_tp, field="decode_tp")
    sizes = _Sizes(num_kv_heads, prefill_tp, decode_tp)
    assignments: list[Assignment] = []
    for decode_rank in range(decode_tp):
        heads = heads_of_rank(num_kv_heads, decode_tp, decode_rank, field="decode_tp")
        run_start, run_rank = heads.start, None
        for head in range(heads.start, heads.stop + 1):
            rank = _prefill_rank_for(head, decode_rank, sizes) if head < heads.stop else None
            if rank != run_rank:
                if run_rank is not None:
                    assignments.append(Assignment(run_rank, decode_rank, HeadRange(run_start, head)))
                run_start, run_rank = head, rank
    if prefill_tp == decode_tp:
        direction = Direction.SAME
    elif prefill_tp > decode_tp:
        direction = Direction.FAN_IN
    else:
        direction = Direction.FAN_OUT
    ratio = max(prefill_tp, decode_tp) // min(prefill_tp, decode_tp)
    return TPMapping(num_kv_heads, prefill_tp, decode_tp, direction, ratio, tuple(assignments))
