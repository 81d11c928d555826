"""`kvxfer bench --plan staged`: gather, one WRITE per peer, scatter, between real processes,
byte-verified by torch indexing; also across layouts, block sizes and replicated heads."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("args", [
    ["--prefill-tp", "1", "--decode-tp", "2"],
    ["--prefill-tp", "2", "--decode-tp", "1", "--staged-groups", "1"],
    ["--prefill-tp", "4", "--decode-tp", "2", "--kv-heads", "2", "--prefill-block-size", "16",
     "--decode-block-size", "32", "--decode-layout", "packed", "--fallback", "fine"],
])
def test_staged_write_is_byte_exact(args):
    out = subprocess.run(
        [sys.executable, "-m", "kvxfer.cli", "bench", "--plan", "staged", "--mode", "write", "--layers", "2",
         "--tokens", "200", "--head-dim", "32", "--iters", "1", "--verify", "--json", *args],
        capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["verified"] is True and result["plan"] == "staged"
    assert result["descriptors"] == result["num_transfers"]  # one descriptor per peer


def test_auto_plan_calibrates_and_reports_both_paths():
    out = subprocess.run(
        [sys.executable, "-m", "kvxfer.cli", "bench", "--plan", "auto", "--layers", "2", "--tokens", "256",
         "--head-dim", "64", "--iters", "1", "--verify", "--json"],
        capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    model = result["cost_model"]
    assert result["verified"] is True
    assert model["choice"].split("/")[0] == ("staged" if result["plan"] == "staged" else "direct")
    assert set(model["measured_gbps"]) == {"prepped", "staged", "per-block"}
    assert "speed-up over per-block" in out.stdout
    assert model["costs"]["per_descriptor_s"] > 0 and model["direct_descriptors"] > 0


def test_gpu_sharing_names_mps_only_when_its_control_pipe_is_there(tmp_path, monkeypatch):
    from kvxfer.bench.session import gpu_sharing

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert gpu_sharing() == "time-sliced"
    os.mkfifo(tmp_path / "control")
    assert gpu_sharing() == "mps"
