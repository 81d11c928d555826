"""`kvxfer plan` end to end through the real entry point."""

import json
import subprocess
import sys

import pytest


def kvxfer(*args):
    return subprocess.run([sys.executable, "-m", "kvxfer.cli", *args], capture_output=True, text=True)


def test_plan_table_for_replicated_prefill():
    out = kvxfer("plan", "--prefill-tp", "4", "--decode-tp", "2", "--kv-heads", "2", "--layout", "flashinfer-hnd")
    assert out.returncode == 0, out.stderr
    assert "prefill TP 4 -> decode TP 2 (fan-in, ratio 2)" in out.stdout
    assert "[0, 1)" in out.stdout and "[1, 2)" in out.stdout


def test_plan_json_counts_descriptors_and_bytes():
    out = kvxfer("plan", "--decode-tp", "2", "--tokens", "64", "--layers", "2", "--random-blocks", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    # 64 tokens / block 16 = 4 blocks, x 2 layers x K,V = 16 spans per decode rank at most
    assert [p["heads"] for p in result["peers"]] == [[0, 4], [4, 8]]
    assert result["bytes"] == 2 * 2 * 64 * 8 * 128 * 2
    assert all(p["descriptors"] <= 16 for p in result["peers"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prefill-tp", "3"], "prefill_tp=3 neither divides nor is a multiple of num_kv_heads=8"),
        (["--layout", "flashinfer-nhd"], "not contiguous per block on both sides"),
        (["--tokens", "0"], "--tokens=0 must be positive"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = kvxfer("plan", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
