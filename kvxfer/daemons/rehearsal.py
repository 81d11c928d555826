"""Rehearsals: one short request through each (prefill, decode) pair before its first client
request, so that no client pays for what a pair does only once.

Meeting a producer ahead (kvxfer.daemons.warm: handshakes, NIXL connections, descriptor lists,
calibration, copiers) leaves a pair's first request still 1.6-3.8x slower than the rest (CPU
TP 1 -> 1 WRITE 6-9 ms against 2.6-3.9; the H200 3.5-5.8 against 1.5): the first run of every step
of the request path in each process (the proxy, prefill and decode and their ranks), the first
push request and notification between two ranks. No probe runs those steps; a request does. So
the proxy sends one (`PROMPT`, `MAX_TOKENS` tokens: a decode step too) through the pair, the way
it sends a client's, and checks that it was answered.

A pair is rehearsed once both of its servers are ready (a health check finds one newly ready:
a new pod, a restart), one rehearsal per pair at a time, a few pairs at once. One that fails is
logged and counted, not retried until one of its servers turns ready anew: its first client
request then pays the first-time costs, as without rehearsals. The proxy's `/ready` waits for
the rehearsals of the ready pairs (each within the request timeout): a client request sent after
it meets warm pairs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

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
    state: State = State.DUE
    seconds: float = 0.0
    error: str = ""


class Rehearsals:
    """Which pairs are rehearsed, and the rehearsals themselves (run by `run`, the proxy's own
    request through one pair, raising on failure)."""

    def __init__(self, run: Callable[[Pair], Awaitable[None]], *, enabled: bool, timeout_s: float) -> None:
        self._run = run
        self.enabled = enabled
        self.timeout_s = timeout_s
        self._pairs: dict[Pair, _Rehearsal] = {}
        self._at_once = asyncio.Semaphore(AT_ONCE)

    def turned_ready(self, url: str) -> None:
        """A server turned ready (first, or after a restart): its pairs are rehearsed anew."""
        for pair in self._pairs:
            if url in pair:
                self._pairs[pair] = _Rehearsal()  # one still running ends unrecorded (`_ended`)

    def due(self, prefill: list[str], decode: list[str]) -> list[Pair]:
        """The pairs of these ready servers to rehearse now (marked running)."""
        if not self.enabled:
            return []
        pairs = []
        for pair in ((p, d) for p in prefill for d in decode):
            rehearsal = self._pairs.setdefault(pair, _Rehearsal())
            if rehearsal.state is State.DUE:
                rehearsal.state = State.RUNNING
                pairs.append(pair)
        return pairs

    def pending(self, prefill: list[str], decode: list[str]) -> int:
        """Rehearsals of these ready servers' pairs not ended yet (what `/ready` waits for)."""
        if not self.enabled:
            return 0
        return sum(self._pairs.get((p, d), _Rehearsal()).state in (State.DUE, State.RUNNING)
                   for p in prefill for d in decode)

    async def rehearse(self, pair: Pair, record: Callable[[str], None]) -> None:
        """Rehearse `pair`; `record(outcome)` counts it ("ok" or the error's kind)."""
        mine = self._pairs[pair]
        async with self._at_once:
            started = time.monotonic()
            try:
                await asyncio.wait_for(self._run(pair), timeout=self.timeout_s)
            except Exception as err:  # a failed rehearsal only means a cold first request
                kind = getattr(err, "kind", "timeout" if isinstance(err, asyncio.TimeoutError) else type(err).__name__)
                mine.state, mine.error = State.FAILED, f"{kind}: {err}"
                record(kind)
                log.warning("rehearsal of prefill %s -> decode %s failed after %.1f ms (%s); the pair's first "
                            "client request pays its first-time costs", *pair, (time.monotonic() - started) * 1e3,
                            mine.error)
                return
            seconds = time.monotonic() - started
            mine.state, mine.seconds = State.DONE, seconds
            record("ok")
            log.info("rehearsed prefill %s -> decode %s: one request in %.1f ms, before any client's", *pair,
                     seconds * 1e3)
