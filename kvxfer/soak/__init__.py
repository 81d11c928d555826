"""The soak: the CPU demo topology under a bounded load and random faults, with one report.

`run_soak(config)` starts prefill TP 2, decode TP 4 and the proxy on loopback (CURVE on),
supervises them (a service that exits is restarted, as Kubernetes would), drives a fixed number
of requests at a fixed concurrency, injects faults with its own recorded seed, then checks that
no block stays held once leases expire. With `hosts=2` prefill and decode run on two hosts
(kvxfer.hosts) and link faults join the mix. See README.md in this directory.
"""

from kvxfer.soak.config import FAULT_KINDS, SoakConfig
from kvxfer.soak.report import Report

__all__ = ["FAULT_KINDS", "Report", "SoakConfig", "run_soak"]


def run_soak(config: SoakConfig) -> Report:
    from kvxfer.soak.run import run_soak as _run

    return _run(config)
