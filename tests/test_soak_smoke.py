"""The soak in small (`make soak` is the long run): the demo topology under a few dozen requests
and a handful of faults of every kind. No wrong answer, no hung request, no unclear failure, no
block held once leases expire; every fault kind is injected at least once."""

from __future__ import annotations

import pytest

from kvxfer.soak import FAULT_KINDS, SoakConfig, run_soak
from kvxfer.soak.procs import rank_pids
from kvxfer.soak.prompts import prompt_texts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_soak_smoke(tmp_path):
    # Fault seed 1 with equal weights draws each kind once: kill prefill rank, drop side channel,
    # pause, kill decode rank, restart.
    config = SoakConfig(num_requests=40, num_faults=len(FAULT_KINDS), fault_seed=1, concurrency=3,
                        max_time_s=240, weights={k: 1.0 for k in FAULT_KINDS}, workdir=tmp_path)
    report = run_soak(config)
    print(report.table())
    assert report.violations() == []
    assert len(report.outcomes) == config.num_requests
    assert report.count("ok") > 0
    assert len(report.faults) >= 4, report.faults


def test_prompts_mix_lengths():
    texts = prompt_texts(24, 240, seed=0)
    assert len(texts[0]) < 20 and len(texts[-1]) == 240
    assert texts == prompt_texts(24, 240, seed=0)


def test_rank_pids_of_a_process_without_workers_is_itself():
    import os

    assert rank_pids(os.getpid())[0] == os.getpid()


def test_soak_smoke_staged(tmp_path):
    """The same checks with every transfer a staged WRITE (CPU: torch gathers and scatters), under
    the faults that leave the services running: a rank paused past the deadline holds its slots
    back, side-channel resets; no staging slot stays reserved once the deadlines have passed."""
    from kvxfer.soak.config import DROP_SIDE_CHANNEL, PAUSE_RANK

    config = SoakConfig(num_requests=24, num_faults=2, fault_seed=3, concurrency=3, max_time_s=240,
                        weights={PAUSE_RANK: 1.0, DROP_SIDE_CHANNEL: 1.0}, mode="write", staging_mib=8,
                        transfer_path="staged", workdir=tmp_path)
    report = run_soak(config)
    print(report.table())
    assert report.violations() == []
    assert report.count("ok") > 0
    assert any("staging slots reserved" in where for where in report.leaked)  # the slots were checked
    # no fault here restarts decode, so its counter covers the whole run: every answer was staged
    assert report.transfer_paths["decode0"].get('kvxfer_transfer_path_total{op="write",path="staged"}', 0) \
        >= report.count("ok")
