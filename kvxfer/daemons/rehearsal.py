"""Rehearsals: one short request through each (prefill, decode) pair before its first client
request, so that no client pays for what a pair does only once.

Meeting a producer ahead (kvxfer.daemons.warm: handshakes, NIXL connections, descriptor lists,
calibration, copiers) leaves a pair's first request still 1.6-3.8x slower than the rest (CPU
TP 1 -> 1 WRITE 6-9 ms against 2.6-3.9; the H200 3.5-5.8 against 1.5): the first run of every step
of the request path in each process (the proxy, prefill and decode and their ranks), the first
push request and notification between two ranks. No probe runs those steps; a request does. So
the proxy sends one (`PROMPT`, `MAX_TOKENS` tokens: a decode step too) through the pair, the way
it sends a client's, and checks that it was answered.

A pair is rehearsed once both of its servers are ready, and again when a health check finds one
of them ready after one that did not (a restart, a new pod behind the URL, or a check that
failed on the way), one rehearsal per pair at a time, a few pairs at once. One that fails is
logged and counted (by kind: the proxy's error kinds, `timeout`, `unavailable`, `bad_answer`),
not retried until one of its servers turns ready anew: its first client request then pays the
first-time costs, as without rehearsals. The proxy's `/ready` waits for each pair's first
rehearsal (each within the request timeout once it runs): a client request sent after it meets
warm pairs. Later ones hold nothing: one server's failed health check must not take the proxy
out of its Service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

import httpx

log = logging.getLogger("kvxfer.proxy")

PROMPT = "kvxfer rehearsal: a pair's first request, sent by the proxy before any client's"
MAX_TOKENS = 2  # the prefill's token and one decode step
AT_ONCE = 4  # pairs rehearsed at the same time (each is one small request on both servers)

Pair = tuple[str, str]  # (prefill url, decode url)


class State(str, Enum):
    DUE = "due"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass
class _Rehearsal:
    """One rehearsal of a pair; a server that turns ready anew replaces it with a new one."""

    first: bool  # the pair's first: `/ready` waits for it
    state: State = State.DUE
    error: str = ""


class Rehearsals:
    """Which pairs are rehearsed, and the rehearsals themselves (run by `run`, the proxy's own
    request through one pair, raising on failure)."""

    def __init__(self, run: Callable[[Pair], Awaitable[None]], *, enabled: bool, timeout_s: float) -> None:
        self._run = run
        self.enabled = enabled
        self.timeout_s = timeout_s
        self._pairs: dict[Pair, _Rehearsal] = {}  # each pair's latest
        self._running: set[Pair] = set()
        self._at_once = asyncio.Semaphore(AT_ONCE)

    def turned_ready(self, url: str) -> None:
        """A server turned ready after a health check that found it not: its pairs are
        rehearsed anew (one still running is the old process's: it ends unrecorded)."""
        for pair in self._pairs:
            if url in pair:
                self._pairs[pair] = _Rehearsal(first=False)

    def due(self, prefill: list[str], decode: list[str]) -> list[tuple[Pair, _Rehearsal]]:
        """The rehearsals of these ready servers' pairs to run now (marked running)."""
        if not self.enabled:
            return []
        due = []
        for pair in ((p, d) for p in prefill for d in decode):
            rehearsal = self._pairs.setdefault(pair, _Rehearsal(first=True))
            if rehearsal.state is State.DUE and pair not in self._running:
                rehearsal.state = State.RUNNING
                self._running.add(pair)
                due.append((pair, rehearsal))
        return due

    def pending(self, prefill: list[str], decode: list[str]) -> int:
        """First rehearsals of these ready servers' pairs not ended yet (what `/ready` waits for)."""
        if not self.enabled:
            return 0
        waiting = 0
        for pair in ((p, d) for p in prefill for d in decode):
            latest = self._pairs.get(pair)
            waiting += latest is None or (latest.first and latest.state in (State.DUE, State.RUNNING))
        return waiting

    async def rehearse(self, pair: Pair, rehearsal: _Rehearsal, record: Callable[[str], None]) -> None:
        """Run `rehearsal` of `pair` (from `due`); `record(outcome)` counts it ("ok" or the
        failure's kind) unless a newer one replaced it meanwhile."""
        try:
            async with self._at_once:
                started = time.monotonic()
                try:
                    await asyncio.wait_for(self._run(pair), timeout=self.timeout_s)
                except Exception as err:  # a failed rehearsal only means a cold first request
                    self._ended(pair, rehearsal, State.FAILED, _kind(err), f"{_kind(err)}: {err}", started, record)
                    return
                self._ended(pair, rehearsal, State.DONE, "ok", "", started, record)
        finally:
            self._running.discard(pair)

    def _ended(self, pair: Pair, rehearsal: _Rehearsal, state: State, outcome: str, error: str, started: float,
               record: Callable[[str], None]) -> None:
        rehearsal.state, rehearsal.error = state, error
        if self._pairs.get(pair) is not rehearsal:
            return  # a server of the pair turned ready anew meanwhile: this answer was the old one's
        record(outcome)
        ms = (time.monotonic() - started) * 1e3
        if state is State.DONE:
            log.info("rehearsed prefill %s -> decode %s: one request in %.1f ms, before any client's", *pair, ms)
        else:
            log.warning("rehearsal of prefill %s -> decode %s failed after %.1f ms (%s); the pair's first "
                        "client request pays its first-time costs", *pair, ms, error)


def _kind(err: Exception) -> str:
    """A failed rehearsal's outcome label: one of a fixed few."""
    kind = getattr(err, "kind", None)
    if isinstance(kind, str):
        return kind  # the proxy's own (ProxyError): prefill_unavailable, kv_load_failed...
    if isinstance(err, (asyncio.TimeoutError, httpx.TimeoutException)):
        return "timeout"
    if isinstance(err, httpx.HTTPError):
        return "unavailable"
    return "bad_answer"  # an answer the proxy could not read (no model listed, not JSON)
