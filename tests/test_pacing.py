"""The idle loops' pace: fast after work, backing off to a cap while idle, woken at once."""

from __future__ import annotations

import threading
import time

import pytest

from kvxfer.agents.pacing import IdlePacer


def test_backs_off_to_the_cap_while_idle_and_resets_after_work():
    pace = IdlePacer(first_s=1e-3, longest_s=8e-3)
    waits = []
    for _ in range(6):
        waits.append(pace.wait_s)
        pace.after(False)
    assert waits == [1e-3, 2e-3, 4e-3, 8e-3, 8e-3, 8e-3]
    pace.after(True)
    assert pace.wait_s == 1e-3
    pace.after(False)
    pace.reset()
    assert pace.wait_s == 1e-3


def test_wake_from_another_thread_ends_a_long_sleep():
    pace = IdlePacer(first_s=30.0, longest_s=30.0)
    slept = threading.Event()
    result = []

    def sleeper():
        slept.set()
        result.append(pace.sleep())

    thread = threading.Thread(target=sleeper)
    began = time.monotonic()
    thread.start()
    slept.wait(5)
    pace.wake()
    thread.join(10)
    assert result == [True]
    assert time.monotonic() - began < 10  # far below the 30 s wait


@pytest.mark.parametrize(("first", "longest"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_rejects_a_pace_that_cannot_back_off(first, longest):
    with pytest.raises(ValueError, match=f"first_s={first}, longest_s={longest}"):
        IdlePacer(first, longest)
