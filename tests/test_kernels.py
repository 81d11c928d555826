"""Kernel builds ahead of time: the process's kernel log (what /metrics counts), the kernel cache
directory `kvxfer warmup` fills and `kvxfer serve --kernel-cache` reads, and the staging copiers
warmup builds for a TP pairing (the GPU build itself is scripts/gpu_kernel_cache.sh's)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from kvxfer.commands.warmup import copier_jobs
from kvxfer.engine import CacheConfig, preset
from kvxfer.kernels import FLASHINFER, TRITON, KernelLog, _seconds, _triton_name, use_cache_dir
from kvxfer.planning import map_tp


def test_compiles_are_counted_before_and_after_ready_and_loads_are_not_compiles(caplog):
    kernels = KernelLog()
    kernels.record(FLASHINFER, "decode q_heads=8", 5.0, compiled=True)
    kernels.record(TRITON, "_copy_units(UNIT=8192)", 0.4, compiled=False)
    kernels.mark_ready()
    with caplog.at_level("WARNING", logger="kvxfer.kernels"):
        kernels.record(TRITON, "_copy_units(UNIT=256)", 0.8, compiled=True)
        kernels.record(TRITON, "_copy_units(UNIT=1024)", 0.1, compiled=False)
    assert (kernels.compiles(after_ready=False), kernels.compiles(after_ready=True)) == (1, 1)
    assert [b.after_ready for b in kernels.builds()] == [False, False, True, True]
    assert [r.getMessage() for r in caplog.records] == [
        "kernel compiled after ready (a request waits for it): triton _copy_units(UNIT=256) in 0.80 s"]


def test_triton_compiles_are_named_by_kernel_and_constexprs_and_timed_in_seconds():
    fn = SimpleNamespace(__name__="_copy_units", arg_names=["cache", "buffer", "UNIT", "TO_SLOT"])
    src = SimpleNamespace(fn=fn, constants={(2,): 8192, (3,): True})
    assert _triton_name(src) == "_copy_units(UNIT=8192, TO_SLOT=True)"
    times = SimpleNamespace(ir_initialization=1_000, lowering_stages=[("ttir", 2_000), ("cubin", 500_000)],
                            store_results=7_000)
    assert _seconds(times) == pytest.approx(0.51)
    assert _seconds(None) == 0.0


def test_the_kernel_cache_directory_holds_both_libraries_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("FLASHINFER_WORKSPACE_BASE", raising=False)
    root = use_cache_dir(tmp_path / "kernels")
    assert os.environ["TRITON_CACHE_DIR"] == str(root / "triton")
    assert os.environ["FLASHINFER_WORKSPACE_BASE"] == str(root)


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 1), (1, 2), (2, 4), (2, 1)])
def test_warmup_builds_every_copier_a_pairing_runs_both_sides(prefill_tp, decode_tp):
    model = preset("tiny-demo")
    jobs = copier_jobs(model, CacheConfig(num_blocks=8), prefill_tp, decode_tp, dtype=torch.float32,
                       device=torch.device("cpu"))
    mapping = map_tp(model.num_kv_heads, prefill_tp, decode_tp)
    gathers = [j for j in jobs if j.to_slot]
    scatters = [j for j in jobs if not j.to_slot]
    # a prefill rank gathers each decode rank's heads on its own; a decode rank scatters all its sources at once
    assert [len(j.plans) for j in gathers] == [1] * len(mapping.assignments)
    assert [len(j.plans) for j in scatters] == [len(mapping.sources_of(d)) for d in range(decode_tp)]
    for job in jobs:
        assert len(job.layers) == model.num_layers
        assert job.buffer_bytes == sum(p.units_per_layer(job.max_tokens) * p.unit_bytes for p in job.plans) \
            * model.num_layers > 0


def test_warmup_on_cpu_has_nothing_to_compile_and_refuses_malformed_pairs():
    ok = subprocess.run([sys.executable, "-m", "kvxfer.cli", "warmup", "--model", "tiny", "--device", "cpu",
                         "--pairs", "1:2"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "torch attention path and torch staging have nothing to compile" in ok.stderr
    bad = subprocess.run([sys.executable, "-m", "kvxfer.cli", "warmup", "--model", "tiny", "--pairs", "2-4"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "--pairs '2-4': expected PREFILL_TP:DECODE_TP" in bad.stderr
