"""The NIXL notifications of one agent, with one owner.

Notifications arrive whenever NIXL is driven, not when the one who waits for them asks, so they
are filed by request as they come (`collect`) and taken by whoever waits for them (`wait`, `take`).
One lock guards the agent's notification queue and the files: a poll thread and a waiting thread
may share an inbox. Notifications nobody takes (a request that already failed) are dropped after
`ttl_s`; malformed ones are logged and counted, never raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kvxfer.agents.limited_log import LimitedLog
from kvxfer.agents.messages import Notif, NotifKind, Status, XferNotif, decode_notif
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.nixl_agent import Backoff, NixlAgent, PollPolicy
from kvxfer.errors import TransferTimeout, error_class

log = logging.getLogger(__name__)
# Waiting for a peer's notification: sleep between looks from the start. A spin would take the
# core the peer (on the same host) needs to do the very work we wait for; a long sleep would
# leave a notification that came meanwhile waiting for its end (on average half of it).
WAIT_POLICY = PollPolicy(spin_s=0.0, min_sleep_s=20e-6, max_sleep_s=100e-6)


@dataclass(frozen=True)
class Notice:
    """One notification: the NIXL agent that sent it and what it says."""

    agent: str  # as NIXL names the sender: not authenticated (a `PushAsk` carries a MAC for that)
    notif: Notif


class Inbox:
    def __init__(self, agent: NixlAgent, *, lock: threading.RLock, metrics: TransferMetrics | None = None,
                 ttl_s: float = 300.0) -> None:
        self._agent = agent
        self._lock = lock
        self._metrics = metrics
        self._ttl_s = ttl_s
        self._filed: dict[str, tuple[float, list[Notice]]] = {}  # request id -> (first seen, notices)
        self._malformed = LimitedLog(log)

    def collect(self) -> int:
        """Drive NIXL once and file what arrived; returns how many notifications did."""
        with self._lock:
            raw = self._agent.collect_notifs()
        now = time.monotonic()
        with self._lock:
            for agent, payload in raw:
                notice = self._decode(agent, payload)
                if notice is not None:
                    self._filed.setdefault(notice.notif.request_id, (now, []))[1].append(notice)
            for rid in [r for r, (seen, _) in self._filed.items() if now - seen > self._ttl_s]:
                del self._filed[rid]
        return len(raw)

    def take(self, request_id: str) -> list[Notice]:
        with self._lock:
            return self._filed.pop(request_id, (0.0, []))[1]

    def take_all(self) -> list[Notice]:
        with self._lock:
            filed, self._filed = self._filed, {}
        return [n for _, notices in filed.values() for n in notices]

    def wait(self, request_id: str, kind: NotifKind, senders: Mapping[int, str], *, timeout_s: float,
             what: Callable[[set[int]], str], watch: Callable[[], None] | None = None) -> None:
        """Until a notification of `kind` for `request_id` arrived from each rank of `senders`,
        sent by that rank's own NIXL agent (rank -> agent name: another agent's is ignored). A
        sender that reports an error raises it (its kind and message) at once; past `timeout_s`,
        TransferTimeout with `what(missing ranks)`. `watch` runs before each look: it raises to
        end the wait (say, a sender found gone)."""
        missing = set(senders)
        deadline, backoff = time.monotonic() + timeout_s, Backoff(WAIT_POLICY)
        while True:
            if watch is not None:
                watch()
            self.collect()
            for notice in self.take(request_id):
                notif = notice.notif
                if (not isinstance(notif, XferNotif) or notif.kind is not kind or notif.rank not in missing
                        or notice.agent != senders[notif.rank]):
                    continue
                if notif.status is Status.ERROR:
                    raise error_class(notif.error_kind)(f"{what({notif.rank})}: the sender reports "
                                                        f"{notif.message or notif.error_kind or 'an error'}")
                missing.discard(notif.rank)
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TransferTimeout(f"{what(missing)} within {timeout_s:.1f} s")
            backoff.pause()

    def _decode(self, agent: str, payload: bytes) -> Notice | None:
        try:
            return Notice(agent, decode_notif(payload))
        except Exception as err:  # a peer's bytes: never let them stop the poll loop
            self._malformed.warning("dropping a malformed notification from %s: %s", agent, err)
            if self._metrics is not None:
                self._metrics.observe_failure("malformed")
            return None
