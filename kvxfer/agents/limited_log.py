"""Warnings about input from peers, at most one line per interval: a peer sending junk in a loop
(buggy or hostile) must not flood the log or slow the thread that reads it."""

from __future__ import annotations

import logging
import time


class LimitedLog:
    """One warning line per `interval_s` at most; the next one says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0):
        self._log = logger
        self.interval_s = interval_s
        self._next = 0.0
        self._suppressed = 0

    def warning(self, fmt: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} similar suppressed)" if self._suppressed else ""
        self._log.warning(fmt + suffix, *args)
        self._next, self._suppressed = now + self.interval_s, 0
