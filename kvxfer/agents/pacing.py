"""How often an idle loop drives NIXL: soon after work, less and less often while nothing happens.

Every rank of every service runs such a loop (notifications only leave and arrive when a NIXL
agent is progressed). Polled at a fixed millisecond, an idle rank burns ~8% of a core, so a host
with dozens of idle ranks is busy doing nothing and starves the ranks that are starting. Backing
off to `longest_s` keeps an idle rank near 0% while a loop that just did work polls at `first_s`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class IdlePacer:
    first_s: float = 1e-3
    longest_s: float = 20e-3
    _wait_s: float = field(init=False, default=0.0)
    _woken: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.longest_s:
            raise ValueError(f"IdlePacer: want 0 < first_s <= longest_s, got first_s={self.first_s}, "
                             f"longest_s={self.longest_s}")
        self._wait_s = self.first_s

    @property
    def wait_s(self) -> float:
        """How long the loop may wait before its next idle call."""
        return self._wait_s

    def after(self, busy: bool) -> None:
        """Record the outcome of an idle call: work keeps the pace fast, none slows it down."""
        self._wait_s = self.first_s if busy else min(self._wait_s * 2, self.longest_s)

    def reset(self) -> None:
        """Work just happened (a command ran): poll soon again."""
        self._wait_s = self.first_s

    def wake(self) -> None:
        """Work is coming from another thread: the loop's current `sleep` ends now."""
        self.reset()
        self._woken.set()

    def sleep(self) -> bool:
        """Wait `wait_s` or until woken; True if woken."""
        woken = self._woken.wait(self._wait_s)
        self._woken.clear()
        return woken
