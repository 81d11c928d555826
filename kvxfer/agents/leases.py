"""Leases: a producer holds a request's blocks until every expected consumer confirmed its read,
the request is aborted, or the lease expires (consumers renew it with heartbeats).

Pure logic, no NIXL, no clock: callers pass `now` (seconds, any monotonic origin). Every way a
lease ends returns a `Released` exactly once, carrying the blocks to free; a block is never held
by two leases at once, so following the returned values never double-frees and never leaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from kvxfer.agents.metrics import TransferMetrics
from kvxfer.errors import ConfigError, LeaseError


class Outcome(Enum):
    CONFIRMED = "confirmed"  # every consumer confirmed
    ABORTED = "aborted"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Released:
    """A lease that ended: free `blocks` now, once."""

    request_id: str
    blocks: tuple[int, ...]
    outcome: Outcome


@dataclass
class _Lease:
    blocks: tuple[int, ...]
    consumers: frozenset[str]
    expires_at: float
    confirmed: set[str] = field(default_factory=set)


class LeaseTable:
    """The producer's leases, by request id."""

    def __init__(self, *, ttl_s: float, metrics: TransferMetrics | None = None) -> None:
        if ttl_s <= 0:
            raise ConfigError(f"lease ttl_s={ttl_s} must be positive")
        self.ttl_s = ttl_s
        self._metrics = metrics
        self._leases: dict[str, _Lease] = {}
        self._owner: dict[int, str] = {}  # block -> request id holding it

    def acquire(self, request_id: str, blocks: Sequence[int], consumers: Iterable[str], *,
                now: float) -> float:
        """Hold `blocks` for `consumers` until `now + ttl_s`; returns that expiry."""
        who = frozenset(consumers)
        ids = tuple(int(b) for b in blocks)
        if request_id in self._leases:
            raise LeaseError(f"request {request_id}: already holds a lease")
        if not who:
            raise LeaseError(f"request {request_id}: a lease needs at least one consumer")
        if len(set(ids)) != len(ids):
            raise LeaseError(f"request {request_id}: block ids repeat in {list(ids)}")
        taken = [b for b in ids if b in self._owner]
        if taken:
            raise LeaseError(
                f"request {request_id}: block {taken[0]} is held by request {self._owner[taken[0]]}")
        self._leases[request_id] = _Lease(ids, who, now + self.ttl_s)
        self._owner.update((b, request_id) for b in ids)
        self._observe()
        return now + self.ttl_s

    def confirm(self, request_id: str, consumer: str, *, now: float) -> Released | None:
        """`consumer` finished reading. Returns the release when it was the last one."""
        lease = self._live(request_id, consumer, now, verb="confirm")
        lease.confirmed.add(consumer)
        if lease.confirmed != lease.consumers:
            return None
        return self._end(request_id, Outcome.CONFIRMED)

    def renew(self, request_id: str, consumer: str, *, now: float) -> float:
        """Extend the lease to `now + ttl_s` (a consumer's heartbeat); returns the new expiry."""
        lease = self._live(request_id, consumer, now, verb="renew")
        lease.expires_at = max(lease.expires_at, now + self.ttl_s)
        return lease.expires_at

    def abort(self, request_id: str) -> Released:
        """End the lease now, whoever confirmed."""
        if request_id not in self._leases:
            raise LeaseError(f"request {request_id}: abort of a lease not held "
                             f"(never granted, or already confirmed, aborted or expired)")
        return self._end(request_id, Outcome.ABORTED)

    def expire(self, now: float) -> list[Released]:
        """End every lease whose expiry is at or before `now`, oldest first."""
        due = sorted((lease.expires_at, rid) for rid, lease in self._leases.items()
                     if lease.expires_at <= now)
        return [self._end(rid, Outcome.EXPIRED) for _, rid in due]

    def holds(self, request_id: str) -> bool:
        return request_id in self._leases

    def pending(self, request_id: str) -> frozenset[str]:
        """Consumers that have not confirmed yet."""
        lease = self._leases.get(request_id)
        if lease is None:
            raise LeaseError(f"request {request_id}: no lease held")
        return lease.consumers - lease.confirmed

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    @property
    def num_blocks_held(self) -> int:
        return len(self._owner)

    def _live(self, request_id: str, consumer: str, now: float, *, verb: str) -> _Lease:
        lease = self._leases.get(request_id)
        if lease is None:
            raise LeaseError(f"request {request_id}: {verb} by {consumer} of a lease not held "
                             f"(never granted, or already confirmed, aborted or expired)")
        if consumer not in lease.consumers:
            raise LeaseError(f"request {request_id}: {verb} by {consumer}, not one of the "
                             f"consumers {sorted(lease.consumers)}")
        if now >= lease.expires_at:
            raise LeaseError(f"request {request_id}: {verb} by {consumer} at {now:.3f} after "
                             f"the lease expired at {lease.expires_at:.3f}")
        return lease

    def _end(self, request_id: str, outcome: Outcome) -> Released:
        lease = self._leases.pop(request_id)
        for b in lease.blocks:
            del self._owner[b]
        if self._metrics is not None:
            self._metrics.lease_ended(outcome.value)
        self._observe()
        return Released(request_id, lease.blocks, outcome)

    def _observe(self) -> None:
        if self._metrics is not None:
            self._metrics.observe_leases(num_leases=len(self._leases), num_blocks=len(self._owner))
