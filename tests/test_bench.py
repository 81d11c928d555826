"""`kvxfer bench` end to end on a tiny request: table, JSON last line with the documented fields,
verification, and a dump anyone can check independently of kvxfer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kvxfer.cli import main
from kvxfer.verify import read_request

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TINY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--tokens", "40", "--iters", "2"]
FIELDS = {"bytes", "descriptors", "plan_us", "transfer_ms", "gbps", "memcpy_gbps", "ratio", "verified"}


def test_bench_auto_json_verify_and_dump(tmp_path, capsys):
    status = main(["bench", *TINY, "--decode-tp", "2", "--block-size", "16", "--decode-block-size", "8",
                   "--mode", "auto", "--verify", "--dump", str(tmp_path), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 0
    result = json.loads(out[-1])
    assert FIELDS <= set(result)
    assert result["verified"] is True and result["mode"] in ("read", "write", "split")
    assert set(result["auto"]) == {"read", "write", "split"}
    # 2 layers x 40 tokens x 2 heads x 16 bf16 values x K and V, over both decode ranks (chunks
    # of gcd(16, 8) = 8 tokens, so no block tail rides along).
    assert result["bytes"] == 2 * 40 * 2 * 16 * 2 * 2
    assert "memcpy_gbps" in "\n".join(out[:-1])

    prefill = load_file(tmp_path / "prefill0.safetensors")
    for rank in (0, 1):
        decode = load_file(tmp_path / f"decode{rank}.safetensors")
        for layer in (0, 1):
            want = read_request("flashinfer-hnd", prefill[f"layer{layer}.after"],
                                prefill["block_ids"], 40)[:, rank:rank + 1]
            got = read_request("flashinfer-hnd", decode[f"layer{layer}.after"], decode["block_ids"], 40)
            before = read_request("flashinfer-hnd", decode[f"layer{layer}.before"], decode["block_ids"], 40)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
            assert not torch.equal(before.view(torch.int16), want.view(torch.int16))


def test_bench_naive_per_block_plan(capsys):
    assert main(["bench", *TINY, "--mode", "read", "--plan", "per-block", "--no-random-blocks",
                 "--threading", "progress-thread", "--ucx-error-handling", "peer", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["plan"] == "per-block" and result["verified"] is None
    # one descriptor per (layer, block): K and V of a block are adjacent in HND and fuse
    assert result["descriptors"] == 2 * 3


def test_bench_refuses_bad_flags(capsys):
    assert main(["bench", *TINY, "--prefill-tp", "3"]) == 2
    assert "prefill_tp=3" in capsys.readouterr().err
