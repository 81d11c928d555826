"""Paged attention on CPU against a float64 dense reference, in every kvxfer layout.

The reference never sees pages: each request's K/V is a dense [H, L, D] tensor, scattered into the
cache through `kvxfer.verify.write_request` (torch views written independently of attention's).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer import attention
from kvxfer.attention import PagedAttention, PageTable, WarmupShape
from kvxfer.errors import ConfigError, LayoutError
from kvxfer.layouts import LAYOUTS, Geometry, get_layout
from kvxfer.verify import read_request, write_request

D, BS, NUM_PAGES = 16, 4, 32


def reference(q, k, v, num_cached):
    """q: [n, Hq, D], k/v: [Hkv, L, D] float64 -> [n, Hq, D]; query i sits at num_cached + i."""
    n, hq, _ = q.shape
    hkv, length, _ = k.shape
    out = torch.zeros(n, hq, D, dtype=torch.float64)
    for i in range(n):
        visible = num_cached + i + 1
        for h in range(hq):
            kh, vh = k[h // (hq // hkv), :visible], v[h // (hq // hkv), :visible]
            weights = torch.softmax(kh @ q[i, h] / math.sqrt(D), dim=0)
            out[i, h] = weights @ vh
    return out


def make_cache(layout, num_heads):
    spec = get_layout(layout)
    return torch.zeros(spec.shape(Geometry(NUM_PAGES, BS, num_heads, D)), dtype=torch.float32)


PERM = torch.randperm(NUM_PAGES, generator=torch.Generator().manual_seed(0))


def request_pages(layout, num_tokens, start):
    """Shuffled page ids from PERM[start:], distinct across requests: [n], or [2, n] for
    separate K/V pages. Returns the ids and the next free start."""
    n = -(-num_tokens // BS)
    if get_layout(layout).separate_kv_pages:
        return PERM[start : start + 2 * n].reshape(2, n), start + 2 * n
    return PERM[start : start + n], start + n


def run_case(layout, hq, hkv, requests, seed=0):
    """requests: list of (num_cached, num_new). Writes cached KV by hand, new KV via attention."""
    gen = torch.Generator().manual_seed(seed)
    kv_heads = 1 if layout == "mla" else hkv
    cache = make_cache(layout, kv_heads)
    attn = PagedAttention(layout=layout, num_q_heads=hq, num_kv_heads=kv_heads, head_dim=D,
                          block_size=BS, dtype=torch.float32, device="cpu")
    pages, dense, qs, news, start = [], [], [], [], 0
    for cached, new in requests:
        ids, start = request_pages(layout, cached + new, start)
        kv = torch.randn(2, kv_heads, cached + new, D, generator=gen, dtype=torch.float64)
        if layout == "mla":
            kv[1] = kv[0]
        if cached:
            write_request(layout, cache, ids, kv[: 1 if layout == "mla" else 2, :, :cached].float())
        pages.append(ids)
        dense.append(kv)
        qs.append(torch.randn(new, hq, D, generator=gen, dtype=torch.float64))
        news.append(kv[:, :, cached:].permute(0, 2, 1, 3))  # [2, new, H, D]
    table = PageTable.build(pages, [c for c, _ in requests], [n for _, n in requests],
                            block_size=BS, separate_kv_pages=get_layout(layout).separate_kv_pages)
    attn.plan(table)
    attn.write(cache, torch.cat([x[0] for x in news]).float(), torch.cat([x[1] for x in news]).float())
    out = attn.run(torch.cat(qs).float(), cache)
    expected = torch.cat([reference(q, kv[0], kv[1], c) for q, kv, (c, _) in zip(qs, dense, requests, strict=True)])
    return out, expected, cache, pages, dense


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    "requests",
    [
        [(0, 7)],  # prefill from empty
        [(0, 5), (6, 3), (0, 1)],  # batched prefill, one with a cached prefix
        [(9, 1), (3, 1), (0, 1), (15, 1)],  # decode batch
    ],
    ids=["prefill", "prefill-batch", "decode-batch"],
)
def test_torch_attention_matches_float64(layout, requests):
    out, expected, *_ = run_case(layout, hq=4, hkv=2, requests=requests)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    layout=st.sampled_from(sorted(LAYOUTS)),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (6, 2), (8, 8)]),
    requests=st.lists(st.tuples(st.integers(0, 10), st.integers(1, 6)), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_any_batch_matches_float64(layout, heads, requests, seed):
    """Any mix of cached prefixes and new tokens, any GQA group, any layout."""
    out, expected, *_ = run_case(layout, hq=heads[0], hkv=heads[1], requests=requests, seed=seed)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["flashinfer-hnd", "packed", "trtllm-nhd"])
def test_write_lands_where_verify_reads(layout):
    _, _, cache, pages, dense = run_case(layout, hq=2, hkv=2, requests=[(5, 3), (0, 6)])
    for ids, kv in zip(pages, dense, strict=True):
        got = read_request(layout, cache, ids, kv.shape[2])
        torch.testing.assert_close(got.double(), kv, rtol=1e-6, atol=1e-6)


def test_gqa_group_of_four_and_mqa():
    for hq, hkv in ((8, 2), (4, 1)):
        out, expected, *_ = run_case("flashinfer-nhd", hq=hq, hkv=hkv, requests=[(6, 2), (2, 1)])
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_too_few_pages_is_a_layout_error():
    with pytest.raises(LayoutError, match=r"request 0: 9 tokens at block_size=4 need 3 blocks, got 2"):
        PageTable.build([[0, 1]], [8], [1], block_size=4)


def test_run_before_plan_is_a_layout_error():
    attn = PagedAttention(layout="packed", num_q_heads=2, num_kv_heads=2, head_dim=D,
                          block_size=BS, dtype=torch.float32, device="cpu")
    with pytest.raises(LayoutError, match="before plan"):
        attn.run(torch.zeros(1, 2, D), make_cache("packed", 2))


def test_cpu_has_no_flashinfer_and_says_why():
    assert "not CUDA" in attention.flashinfer_gap("flashinfer-hnd", torch.bfloat16, 128, torch.device("cpu"))
    with pytest.raises(ConfigError, match="backend=flashinfer: device cpu is not CUDA"):
        PagedAttention(layout="flashinfer-hnd", num_q_heads=2, num_kv_heads=2, head_dim=128,
                       block_size=16, dtype=torch.bfloat16, device="cpu", backend="flashinfer")


def test_warmup_on_cpu_logs_each_kernel(caplog):
    shape = WarmupShape("flashinfer-hnd", 4, 2, D, BS, torch.float32)
    with caplog.at_level("INFO", logger="kvxfer.attention"):
        records = attention.warmup([shape, shape], device="cpu")
    assert [r.kernel.split()[0] for r in records] == ["decode", "prefill"]
    assert all(r.backend == "torch" and r.compiled == () for r in records)
    assert sum("warmup: torch kernel" in m for m in caplog.messages) == 2
