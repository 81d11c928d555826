"""A decode service's blocks of failed READs, kept from the pool until they are safe.

A decode rank's READ given up at its deadline may still land later (kvxfer.agents.nixl_agent
`Landing`; docs/two-hosts.md). The service does not know which rank's did, so after every failed
READ it keeps the request's blocks here and asks the ranks (`AskLanding`, one bus call for every
request kept) until none of them names the request; only then do the blocks go back to the pool.
A failure with nothing still running is freed at the first check, a few milliseconds later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CHECK_EVERY_S = 0.2  # between two calls to the ranks while something is kept


class LandingBlocks:
    def __init__(self, *, ask: Callable[[list[str]], set[str]], free: Callable[[list[int]], None]) -> None:
        self._ask = ask  # transfer ids -> those some rank still has READs running for
        self._free = free
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[list[int], float]] = {}  # transfer id -> (blocks, since)
        self._checked = 0.0

    def keep(self, transfer_id: str, ids: list[int]) -> None:
        with self._lock:
            self._kept[transfer_id] = (list(ids), time.monotonic())

    @property
    def num_blocks(self) -> int:
        with self._lock:
            return sum(len(ids) for ids, _ in self._kept.values())

    def due(self) -> bool:
        """Something is kept and the last check is old enough (the idle thread asks)."""
        return bool(self._kept) and time.monotonic() - self._checked >= CHECK_EVERY_S

    def check(self) -> int:
        """Ask the ranks once; free the blocks of every request none of them still names."""
        self._checked = time.monotonic()
        with self._lock:
            asked = list(self._kept)
        if not asked:
            return 0
        still = self._ask(asked)
        with self._lock:
            safe = {t: self._kept.pop(t) for t in asked if t not in still}
        for transfer_id, (ids, since) in safe.items():
            self._free(ids)
            waited = time.monotonic() - since
            if waited > 1.0:
                log.info("request %s: its given-up READs have ended after %.1f s; %d blocks back in the pool",
                         transfer_id[:8], waited, len(ids))
        return len(safe)
