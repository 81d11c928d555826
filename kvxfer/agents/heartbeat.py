"""The consumer's side of a lease: renewing it while the consumer holds a request (the heartbeat)
and ending it early (`abort`). Side channel only, no NIXL: the vLLM connector keeps its heartbeat
in the scheduler process, where vLLM hands it requests (queued or not) and no NIXL agent lives.

Every producer rank holds its own lease of a request, so renewals and aborts go to each rank.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from kvxfer.agents import messages as m
from kvxfer.agents.sidechannel import ClientCache, producer_target
from kvxfer.errors import KvxferError

log = logging.getLogger(__name__)

BEATS_PER_LEASE = 6  # renew this many times per lease: five renewals can be lost before it ends
LOST_AFTER = 2  # a producer may be told of a request just after its consumer (vLLM: a step later)


@dataclass(frozen=True)
class Renewal:
    """What one round of renewals learnt: new expiries (unix ms), and leases no producer rank
    holds any more (expired, aborted, or the producer restarted). A rank that did not answer
    decides neither: its lease may still run."""

    expires_ms: dict[str, int]
    lost: frozenset[str]


class LeaseClient:
    def __init__(self, clients: ClientCache, *, timeout_s: float) -> None:
        self.clients = clients
        self.timeout_s = timeout_s

    def renew(self, params: Sequence[m.TransferParams]) -> Renewal:
        by_producer: dict[tuple[str, int, str], list[m.TransferParams]] = defaultdict(list)
        for p in params:
            by_producer[p.side_channel, p.tp_size, p.producer_key].append(p)
        calls = [(producer_target(group[0], rank), m.LeaseRenew(request_ids=[p.request_id for p in group]))
                 for group in by_producer.values() for rank in range(group[0].tp_size)]
        expires: dict[str, int] = {}
        lost: set[str] = set()
        for (target, ask), reply in zip(calls, self.clients.request_all(calls, timeout_s=self.timeout_s),
                                        strict=True):
            if not isinstance(reply, m.LeaseRenewed):
                log.info("lease renewal at %s: %s", target.address, reply)
                continue
            lost.update(reply.unknown)
            for rid in reply.renewed:
                expires[rid] = min(expires.get(rid, reply.expires_unix_ms), reply.expires_unix_ms)
            unanswered = set(ask.request_ids) - set(reply.renewed) - set(reply.unknown)
            lost.update(unanswered)
        return Renewal({rid: ms for rid, ms in expires.items() if rid not in lost}, frozenset(lost))

    def abort(self, params: m.TransferParams, *, reason: str, error_kind: str = "") -> None:
        """Every producer rank ends the lease now (best effort: a rank that cannot be told lets it
        expire instead)."""
        ask = m.Abort(request_id=params.request_id, reason=reason[:4000], error_kind=error_kind)
        calls = [(producer_target(params, rank), ask) for rank in range(params.tp_size)]
        for (target, _), reply in zip(calls, self.clients.request_all(calls, timeout_s=min(1.0, self.timeout_s)),
                                      strict=True):
            if isinstance(reply, KvxferError):
                log.info("could not tell %s that %s ended: %s", target.address, params.request_id[:8], reply)


@dataclass
class _Tracked:
    params: m.TransferParams
    expires_ms: int
    due: float  # when it is renewed next (monotonic s): a period after its grant, then after each round
    unknown: int = 0  # renewals in a row its producer did not know it (the first may beat `hold`)
    lost: bool = False

    @property
    def period_s(self) -> float:
        return _period_s(self.params)


def _period_s(params: m.TransferParams) -> float:
    return params.lease_s / BEATS_PER_LEASE


class Heartbeat:
    """Renews the lease of every tracked request, on a thread of its own, until it is untracked
    or its producer says it is gone: `lease_s / BEATS_PER_LEASE` after its grant, then every such
    period. A request that reaches the consumer late in its lease (it travelled slowly: a loaded
    client, a long queue before the consumer) is renewed as soon as it is tracked. A round also
    renews the requests due within half a period, so rounds come about once a period however
    many requests are tracked. Only the first renewal reads the wall clock (the grant is the
    producer's); the schedule after it is monotonic."""

    def __init__(self, leases: LeaseClient) -> None:
        self.leases = leases
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvxfer-heartbeat", daemon=True)
        self._thread.start()

    def track(self, params: m.TransferParams) -> None:
        if params.lease_s <= 0:
            return  # a lease that never expires needs no renewals
        with self._lock:
            if params.request_id not in self._tracked:
                period_s = _period_s(params)
                # a period after its grant by the producer's clock, never more than a period from now (skew)
                first_s = (params.expires_unix_ms - params.lease_s * 1e3) / 1e3 + period_s - time.time()
                due = time.monotonic() + min(max(first_s, 0.0), period_s)
                self._tracked[params.request_id] = _Tracked(params, params.expires_unix_ms, due)
        self._changed.set()

    def untrack(self, transfer_id: str) -> None:
        with self._lock:
            self._tracked.pop(transfer_id, None)

    def valid_until_ms(self, params: m.TransferParams) -> int:
        """The latest expiry known for the request's lease (0 once its producer lost it)."""
        with self._lock:
            tracked = self._tracked.get(params.request_id)
        if tracked is None:
            return params.expires_unix_ms
        return 0 if tracked.lost else tracked.expires_ms

    def beat(self) -> None:
        """One round of renewals of every tracked request now (tests call it)."""
        self._round(every=True)

    def close(self) -> None:
        self._stop.set()
        self._changed.set()
        self._thread.join(5)

    def _round(self, *, every: bool = False) -> None:
        """Renew the live requests due now or within half a period (`every`: all of them)."""
        now = time.monotonic()
        with self._lock:
            due = [t for t in self._tracked.values() if not t.lost and (every or t.due <= now + t.period_s / 2)]
            for t in due:  # answered or not, the next try is a period away
                t.due = now + t.period_s
        if not due:
            return
        renewal = self.leases.renew([t.params for t in due])
        with self._lock:
            for rid, ms in renewal.expires_ms.items():
                if rid in self._tracked:
                    self._tracked[rid].expires_ms, self._tracked[rid].unknown = ms, 0
            for rid in renewal.lost & self._tracked.keys():
                tracked = self._tracked[rid]
                tracked.unknown += 1
                if tracked.unknown >= LOST_AFTER:
                    log.warning("lease of %s is gone at its producer (expired, aborted or restarted)", rid[:8])
                    tracked.lost = True

    def _wait_s(self) -> float | None:
        """Seconds until the next request comes due (None: nothing to renew)."""
        with self._lock:
            due = [t.due for t in self._tracked.values() if not t.lost]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _run(self) -> None:
        while not self._stop.is_set():
            wait_s = self._wait_s()
            if wait_s is None or wait_s > 0:
                self._changed.wait(wait_s)  # a new request may be due at once: look again
                if self._changed.is_set():
                    self._changed.clear()
                    continue
            try:
                self._round()
            except Exception:  # the heartbeat must outlive any one failure
                log.exception("lease heartbeat failed")
