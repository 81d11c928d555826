"""vLLM's own caches moved by real NIXL between processes: every KVCacheLayout of vLLM 0.32
(built by vLLM's `allocate_kv_cache`) with FlashAttention's, Triton's and the CPU backend's
reading, vLLM 0.25's FlashInfer / FlashAttention tensors (HND and NHD), FlashAttention's older
`[2, num_blocks, ...]` and MLA; TP (1,1), (1,2), (2,1); equal and different block sizes, kernel
blocks smaller than vLLM's blocks. Each decode rank checks the K and V tensors its backend itself
would read (FlashAttention: `kv_cache.transpose(1, 2).split(head_size, -1)`), token by token, and
that no block outside the request changed. One process per rank per TP pair, every case in it."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from cache_cases import Case, Side, rank_main, v25, v32, vllm_recipe

pytestmark = [pytest.mark.timeout(300)]


CASES = [
    Case("0.32 LBHNC", v32("LBHNC", 16), v32("LBHNC", 16)),
    Case("0.32 LBHNC kernel 16 of 32 -> 32", v32("LBHNC", 32, 16), v32("LBHNC", 32)),
    Case("0.32 LBNHC", v32("LBNHC", 16), v32("LBNHC", 16)),
    Case("0.32 LHBNC 32 -> 16", v32("LHBNC", 32), v32("LHBNC", 16)),
    Case("0.32 BLHNC 16 -> 32", v32("BLHNC", 16), v32("BLHNC", 32)),
    Case("0.32 BLNHC", v32("BLNHC", 16), v32("BLNHC", 16)),
    Case("0.32 BHLNC", v32("BHLNC", 32), v32("BHLNC", 32)),
    Case("0.32 LBHNC -> BLHNC", v32("LBHNC", 32, 16), v32("BLHNC", 32)),
    Case("0.32 Triton LBHNC", v32("LBHNC", 16, backend="TRITON_ATTN"), v32("LBHNC", 32, backend="TRITON_ATTN")),
    Case("0.32 CPU_ATTN", v32("LBHNC", 32, backend="CPU_ATTN"), v32("LBHNC", 32, backend="CPU_ATTN")),
    Case("0.32 MLA 16 -> 32", Side("mla-0.32", "FLASHMLA", "LBHNC", 16, 16),
         Side("mla-0.32", "FLASHMLA", "LBHNC", 32, 32)),
    Case("0.25 FlashInfer HND 16 -> 32", v25("HND", 16), v25("HND", 32)),
    Case("0.25 FlashInfer NHD", v25("NHD", 16), v25("NHD", 16)),
    Case("0.25 FlashAttention HND kernel 16 of 32 -> 16", v25("HND", 32, 16, "FLASH_ATTN"),
         v25("HND", 16, backend="FLASH_ATTN")),
    Case("0.25 FlashInfer HND -> FlashAttention NHD", v25("HND", 16), v25("NHD", 16, backend="FLASH_ATTN")),
    Case("FlashAttention [2, num_blocks, ...] HND -> 0.25 FlashInfer HND",
         v25("HND", 16, backend="FLASH_ATTN", form="fa-legacy"), v25("HND", 16)),
    Case("0.25 MLA 32 -> 16", Side("mla-0.25", "FLASHMLA", "", 32, 32), Side("mla-0.25", "FLASHMLA", "", 16, 16)),
    # vLLM blocks of r kernel blocks (r = 1, 2, 4) on either side: equal and different vLLM and
    # kernel block sizes. Ids start as vLLM's on both sides, as the connector gets them.
    Case("0.32 LBHNC kernel 16 of 64 -> kernel 16 of 32", v32("LBHNC", 64, 16), v32("LBHNC", 32, 16)),
    Case("0.32 LBHNC 32 -> kernel 16 of 64", v32("LBHNC", 32), v32("LBHNC", 64, 16)),
    Case("0.32 Triton kernel 16 of 32, both", v32("LBHNC", 32, 16, "TRITON_ATTN"),
         v32("LBHNC", 32, 16, "TRITON_ATTN")),
    Case("0.32 LBHNC kernel 16 of 64 -> kernel 32 of 64", v32("LBHNC", 64, 16), v32("LBHNC", 64, 32)),
    Case("0.25 FlashInfer HND kernel 16 of 64 -> 32", v25("HND", 64, 16), v25("HND", 32)),
]
# Head slices of NHD caches, and HND to NHD, are one span per token: strict pairing refuses them
# (the connector asks vLLM for HND), per-token spans still move them.
NHD = {"0.32 LBNHC", "0.32 BLNHC", "0.25 FlashInfer NHD"}
HND_TO_NHD = {"0.25 FlashInfer HND -> FlashAttention NHD"}


def run_pair(prefill_tp: int, decode_tp: int) -> list[list[dict]]:
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for role, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
        for rank in range(tp):
            sides = [c.prefill if role == "prefill" else c.decode for c in CASES]
            recipes = [vllm_recipe(s, tp, rank) if s.form in ("0.32", "mla-0.32") else None for s in sides]
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=rank_main, args=(child, role, tp, rank, CASES, recipes, prefill_tp, decode_tp))
            proc.start()
            procs.append(proc)
            conns.append(parent)
    try:
        hellos = [c.recv() if c.poll(120) else pytest.fail("a rank did not start in 120 s") for c in conns]
        for conn in conns[prefill_tp:]:
            conn.send(hellos[:prefill_tp])
        results = [c.recv() if c.poll(120) else pytest.fail("a decode rank did not finish") for c in conns[prefill_tp:]]
        for conn in conns:
            conn.send("stop")
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


@pytest.mark.parametrize("tps", [(1, 1), (1, 2), (2, 1)], ids=lambda t: f"P{t[0]}-D{t[1]}")
def test_every_layout_arrives_where_the_backend_reads_it(tps):
    results = run_pair(*tps)
    hetero = tps[0] != tps[1]
    for rank, per_case in enumerate(results):
        for case, got in zip(CASES, per_case, strict=True):
            assert got["detail"] == "", f"{case.name}, decode rank {rank}: {got['detail']}"
            assert got["descriptors"] > 0
            if case.name in HND_TO_NHD or (hetero and case.name in NHD):
                assert "not contiguous per block" in got["refused"], case.name
            else:
                assert got["refused"] == "", f"{case.name}: {got['refused']}"
