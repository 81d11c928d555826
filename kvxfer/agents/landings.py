"""Transfers a role gave up while NIXL still runs them, watched until they end.

A request whose transfer failed part way (a deadline, a sibling's error) may still have transfers
on the wire (kvxfer.agents.nixl_agent `Landing`): the memory they name stays reserved until they
end, and their peer may not be forgotten meanwhile (NIXL would report them failed at once, whatever
UCX still does, and they could no longer be watched). One owner per role: the consumer (READs into
its blocks) and the producer (pushes out of its blocks) each keep one. Call under the role's NIXL
lock.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kvxfer.agents.nixl_agent import Landing

Peer = TypeVar("Peer", bound=Hashable)


@dataclass
class Settled(Generic[Peer]):
    requests: list[tuple[str, float]] = field(default_factory=list)  # (transfer id, seconds it ran on)
    peers: list[Peer] = field(default_factory=list)  # to forget now


class Landings(Generic[Peer]):
    def __init__(self) -> None:
        self._running: dict[str, tuple[Peer, Landing]] = {}  # transfer id -> (its peer, its landing)
        self._to_forget: set[Peer] = set()

    def keep(self, transfer_id: str, peer: Peer, landing: Landing) -> None:
        self._running[transfer_id] = (peer, landing)

    def running(self, transfer_id: str) -> bool:
        return transfer_id in self._running

    def __len__(self) -> int:
        return len(self._running)

    def may_forget(self, peer: Peer) -> bool:
        """True: forget `peer` now. False: it is forgotten later, named by `settle` once none of
        its transfers runs."""
        if any(p == peer for p, _ in self._running.values()):
            self._to_forget.add(peer)
            return False
        return True

    def settle(self) -> Settled[Peer]:
        """Poll every landing; the requests whose transfers all ended, and the peers that may be
        forgotten now."""
        out: Settled[Peer] = Settled()
        if not self._running:
            return out
        for transfer_id in [t for t, (_, landing) in self._running.items() if landing.settled()]:
            _, landing = self._running.pop(transfer_id)
            out.requests.append((transfer_id, time.monotonic() - landing.since))
        busy = {p for p, _ in self._running.values()}
        out.peers = sorted(self._to_forget - busy, key=repr)
        self._to_forget &= busy
        return out
