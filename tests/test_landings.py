"""kvxfer.agents.landings: which requests' transfers ended and when a peer may be forgotten.
The landings here are stand-ins whose end the test decides (a real one needs a partition:
tests/hosts/test_late_read.py)."""

from __future__ import annotations

import time

from kvxfer.agents.landings import Landings


class Running:
    def __init__(self) -> None:
        self.ended = False
        self.since = time.monotonic()

    def settled(self) -> bool:
        return self.ended


def test_a_peer_is_forgotten_only_once_no_transfer_to_it_runs():
    landings: Landings[str] = Landings()
    a1, a2, b = Running(), Running(), Running()
    landings.keep("r1", "A", a1)
    landings.keep("r2", "A", a2)
    landings.keep("r3", "B", b)
    assert landings.may_forget("C")  # nothing runs to C
    assert not landings.may_forget("A") and not landings.may_forget("B")
    assert landings.settle().requests == [] and landings.running("r1")

    a1.ended = True
    settled = landings.settle()
    assert [t for t, _ in settled.requests] == ["r1"] and settled.peers == []  # r2 still runs to A
    assert not landings.running("r1") and landings.running("r2")

    a2.ended = b.ended = True
    settled = landings.settle()
    assert sorted(t for t, _ in settled.requests) == ["r2", "r3"] and settled.peers == ["A", "B"]
    assert len(landings) == 0 and landings.settle().peers == []  # each peer named once
