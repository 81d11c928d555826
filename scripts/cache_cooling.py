#!/usr/bin/env python3
"""How much a small step of the request path costs once its process has been idle a while.

Times one step of the kind a transfer request runs a dozen of (a few numpy operations on a short
array and an HMAC over a few hundred bytes), right after an idle gap of each length (sleeping, or
spinning in a loop that touches nothing else), and hot (run back to back). On a machine whose
caches are shared with other tenants, a gap of a few milliseconds already costs the step tens of
times its hot cost: what such a step costs in a request that arrives after one is mostly that.

    .venv/bin/python scripts/cache_cooling.py [--repeats 40]

Prints one line per gap: the median over the repeats, in microseconds.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import statistics
import time
from collections.abc import Callable

import numpy as np

GAPS_S = (0.0, 1e-4, 1e-3, 5e-3, 20e-3, 50e-3)
_IDS = np.arange(16)
_KEY, _MESSAGE = b"k" * 32, b"m" * 200


def step() -> None:
    rows = _IDS[2:6] * 96 + np.arange(4)
    np.add(rows[:, None], np.arange(2), dtype=np.int32).reshape(-1)
    hmac.digest(_KEY, _MESSAGE, hashlib.sha256)


def sleep(gap_s: float) -> None:
    time.sleep(gap_s)


def spin(gap_s: float) -> None:
    until = time.perf_counter() + gap_s
    while time.perf_counter() < until:
        pass


def median_us(idle: Callable[[float], None], gap_s: float, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if gap_s:
            idle(gap_s)
        started = time.perf_counter_ns()
        step()
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40, help="steps timed per gap (default 40)")
    args = parser.parse_args()
    step()
    print(f"{'idle gap':>10}  {'after sleep (us)':>16}  {'after spin (us)':>15}")
    for gap_s in GAPS_S:
        label = "hot" if not gap_s else f"{gap_s * 1e3:g} ms"
        print(f"{label:>10}  {median_us(sleep, gap_s, args.repeats):16.1f}  {median_us(spin, gap_s, args.repeats):15.1f}")


if __name__ == "__main__":
    main()
