"""Property tests of the planner: applying a plan as memcpy between byte buffers reproduces
exactly what torch indexing gives, for every layout pair, TP pair, GQA replication, block-size
ratio and random block ids, with dense layers or layers whose blocks interleave (vLLM's
cross-layer layouts, described from the tensors' strides); destination spans never overlap and
every span stays in its region."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvxfer.layouts import CacheRegion, describe, describe_tensor
from kvxfer.planning import (
    Fallback,
    RequestIndexer,
    descriptor_table,
    heads_of_rank,
    map_tp,
    pair,
    request_indices,
    request_spans,
)
from kvxfer.verify import read_request, write_request

HEAD_LAYOUTS = [
    "flashinfer-hnd",
    "flashinfer-nhd",
    "flash-attn-hnd",
    "flash-attn-nhd",
    "packed",
    "trtllm-hnd",
    "trtllm-nhd",
    "kvlast-hnd",
    "kvlast-nhd",
    "kvlast-hbnd",
]
BLOCK_AXIS = {"flash-attn-hnd": 1, "flash-attn-nhd": 1, "kvlast-hbnd": 1}  # else 0
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
GAP = 64  # bytes between layers in a rank's arena, so an overrun lands in a gap we check


@dataclass
class Rank:
    """One rank's cache in a byte arena: `tensors[l]` are views of `arena`."""

    region: CacheRegion
    arena: np.ndarray
    tensors: list[torch.Tensor]
    block_ids: np.ndarray


def make_rank(layout, *, base, num_layers, num_blocks, block_size, heads, total, head_dim, dtype,
              contiguous_layers, rng, num_tokens, interleaved=False):
    desc = describe(layout, num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                    num_heads=heads.size, first_head=heads.start, total_heads=total,
                    head_dim=head_dim, dtype=dtype)
    if interleaved and not desc.separate_kv_pages:
        return interleaved_rank(desc, base=base, rng=rng, num_tokens=num_tokens)
    stride = desc.layer_bytes + (0 if contiguous_layers else GAP)
    arena = rng.integers(0, 256, size=num_layers * stride + GAP, dtype=np.uint8)
    tensors = [
        torch.frombuffer(memoryview(arena[layer * stride : layer * stride + desc.layer_bytes]),
                         dtype=TORCH_DTYPES[dtype]).view(desc.shape)
        for layer in range(num_layers)
    ]
    return finish_rank(desc, arena, tensors, base + np.arange(num_layers, dtype=np.uint64) * stride,
                       rng=rng, num_tokens=num_tokens)


def interleaved_rank(dense, *, base, rng, num_tokens):
    """Every block holds all layers' pages ([num_blocks, num_layers, page]); each layer's tensor is
    a strided view, described from its own strides."""
    axis = BLOCK_AXIS.get(dense.layout, 0)
    phys = (dense.num_blocks, dense.num_layers, *[n for i, n in enumerate(dense.shape) if i != axis])
    item = dense.item_bytes
    arena = rng.integers(0, 256, size=int(np.prod(phys)) * item + GAP, dtype=np.uint8)
    whole = torch.frombuffer(memoryview(arena), dtype=torch.uint8)[: int(np.prod(phys)) * item]
    whole = whole.view(TORCH_DTYPES[dense.dtype]).view(phys)
    tensors = [whole[:, layer].movedim(0, axis) for layer in range(dense.num_layers)]
    t = tensors[0]
    desc = describe_tensor(dense.layout, tuple(t.shape), tuple(s * item for s in t.stride()),
                           num_layers=dense.num_layers, dtype=dense.dtype, first_head=dense.first_head,
                           total_heads=dense.total_heads)
    offsets = np.array([x.data_ptr() - whole.data_ptr() for x in tensors], dtype=np.uint64)
    return finish_rank(desc, arena, tensors, base + offsets, rng=rng, num_tokens=num_tokens)


def finish_rank(desc, arena, tensors, layer_addrs, *, rng, num_tokens):
    block_size, num_blocks = desc.block_size, desc.num_blocks
    needed = -(-num_tokens // block_size)
    pages = 2 * needed if desc.separate_kv_pages else needed
    ids = rng.permutation(num_blocks)[:pages]
    if desc.separate_kv_pages:
        ids = ids.reshape(2, needed)
    return Rank(CacheRegion(desc, layer_addrs), arena, tensors, ids)


def copy_spans(src_spans, dst_spans, arenas):
    """memcpy each span pair; addresses carry the rank in their high bits."""
    for (sa, sl, _), (da, dl, _) in zip(src_spans.tolist(), dst_spans.tolist(), strict=True):
        assert sl == dl
        s_rank, s_off = divmod(sa, 1 << 40)
        d_rank, d_off = divmod(da, 1 << 40)
        arenas[d_rank][d_off : d_off + dl] = arenas[s_rank][s_off : s_off + sl]


def assert_inside(spans, region):
    desc = region.desc
    addr, length = spans[:, 0], spans[:, 1]
    layer = np.searchsorted(region.layer_addrs, addr, side="right") - 1
    assert (layer >= 0).all()
    assert (addr + length <= region.layer_addrs[layer] + np.uint64(desc.layer_bytes)).all()


@st.composite
def scenarios(draw):
    if draw(st.integers(0, 9)) == 0:
        layouts = ("mla", "mla")
        total = 1
    else:
        layouts = (draw(st.sampled_from(HEAD_LAYOUTS)), draw(st.sampled_from(HEAD_LAYOUTS)))
        total = draw(st.sampled_from([1, 2, 4, 8]))
    valid_tp = [t for t in range(1, 9) if total % t == 0 or t % total == 0]
    return dict(
        layouts=layouts,
        total=total,
        prefill_tp=draw(st.sampled_from(valid_tp)),
        decode_tp=draw(st.sampled_from(valid_tp)),
        block_sizes=(draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.sampled_from([1, 2, 4, 8, 16]))),
        num_layers=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([1, 2, 4])),
        dtype=draw(st.sampled_from(list(TORCH_DTYPES))),
        num_tokens=draw(st.integers(1, 40)),
        extra_blocks=draw(st.integers(0, 5)),
        contiguous_layers=draw(st.booleans()),
        interleaved=draw(st.booleans()),
        read=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def run_scenario(sc):
    rng = np.random.default_rng(sc["seed"])
    total, n = sc["total"], sc["num_tokens"]
    common = dict(num_layers=sc["num_layers"], total=total, head_dim=sc["head_dim"],
                  dtype=sc["dtype"], contiguous_layers=sc["contiguous_layers"], rng=rng, num_tokens=n,
                  interleaved=sc.get("interleaved", False))

    def ranks(side, tp, layout, block_size, first_index):
        out = []
        for r in range(tp):
            heads = heads_of_rank(total, tp, r)
            num_blocks = (2 if layout.startswith("trtllm") else 1) * -(-n // block_size) + sc["extra_blocks"]
            out.append(make_rank(layout, base=(first_index + r) << 40, num_blocks=num_blocks,
                                 block_size=block_size, heads=heads, **common))
        return out

    prefill = ranks("prefill", sc["prefill_tp"], sc["layouts"][0], sc["block_sizes"][0], 0)
    decode = ranks("decode", sc["decode_tp"], sc["layouts"][1], sc["block_sizes"][1], sc["prefill_tp"])
    num_kv = 1 if sc["layouts"][0] == "mla" else 2
    logical = torch.randn(sc["num_layers"], num_kv, total, n, sc["head_dim"]).to(TORCH_DTYPES[sc["dtype"]])
    for rank in prefill:
        lo, hi = rank.region.desc.heads
        for layer, tensor in enumerate(rank.tensors):
            write_request(rank.region.desc.layout, tensor, rank.block_ids, logical[layer][:, lo:hi])
    arenas = [r.arena for r in prefill + decode]
    before = [r.arena.copy() for r in decode]
    written = [np.zeros(r.arena.size, dtype=bool) for r in decode]

    mapping = map_tp(total, sc["prefill_tp"], sc["decode_tp"])
    for a in mapping.assignments:
        p, d = prefill[a.prefill_rank], decode[a.decode_rank]
        if sc["read"]:  # decode is local, pulls from prefill
            plan = pair(d.region, p.region, a.heads, fallback=Fallback.FINE)
            spans = request_spans(plan, d.block_ids, p.block_ids, n)
            src, dst = spans.remote, spans.local
        else:  # prefill is local, pushes into decode's blocks
            plan = pair(p.region, d.region, a.heads, fallback=Fallback.FINE)
            spans = request_spans(plan, p.block_ids, d.block_ids, n)
            src, dst = spans.local, spans.remote
        assert (spans.local[:, 1] == spans.remote[:, 1]).all()
        assert_inside(src, p.region)
        assert_inside(dst, d.region)
        for addr, length, _ in dst.tolist():
            off = addr - (sc["prefill_tp"] + a.decode_rank << 40)
            mask = written[a.decode_rank][off : off + length]
            assert not mask.any(), "destination spans overlap"
            mask[:] = True
        copy_spans(src, dst, arenas)

    for i, rank in enumerate(decode):
        lo, hi = rank.region.desc.heads
        for layer, tensor in enumerate(rank.tensors):
            got = read_request(rank.region.desc.layout, tensor, rank.block_ids, n)
            want = logical[layer][:, lo:hi]
            assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))
        untouched = ~written[i]
        assert np.array_equal(rank.arena[untouched], before[i][untouched]), "wrote outside the plan"


@given(scenarios())
def test_plan_reproduces_torch_indexing(sc):
    run_scenario(sc)


@given(scenarios())
def test_prepped_indices_select_the_same_spans(sc):
    rng = np.random.default_rng(sc["seed"])
    total, n = sc["total"], sc["num_tokens"]
    layouts, block_sizes = sc["layouts"], sc["block_sizes"]
    mapping = map_tp(total, sc["prefill_tp"], sc["decode_tp"])
    a = mapping.assignments[0]
    common = dict(num_layers=sc["num_layers"], total=total, head_dim=sc["head_dim"], dtype=sc["dtype"],
                  contiguous_layers=sc["contiguous_layers"], rng=rng, num_tokens=n,
                  interleaved=sc["interleaved"])
    p = make_rank(layouts[0], base=0, num_blocks=2 * -(-n // block_sizes[0]) + 3, block_size=block_sizes[0],
                  heads=heads_of_rank(total, sc["prefill_tp"], a.prefill_rank), **common)
    d = make_rank(layouts[1], base=1 << 40, num_blocks=2 * -(-n // block_sizes[1]) + 3, block_size=block_sizes[1],
                  heads=heads_of_rank(total, sc["decode_tp"], a.decode_rank), **common)
    plan = pair(d.region, p.region, a.heads, fallback=Fallback.FINE)
    spans = request_spans(plan, d.block_ids, p.block_ids, n, coalesce=False)
    local_idx, remote_idx = request_indices(plan, d.block_ids, p.block_ids, n)
    assert local_idx.dtype == np.int32
    assert np.array_equal(descriptor_table(plan, 0)[local_idx], spans.local)
    assert np.array_equal(descriptor_table(plan, 1)[remote_idx], spans.remote)
    # One indexer serving a short request, then the whole one (its tables grow), gives the same.
    indexer, short = RequestIndexer(plan), max(1, n // 3)
    d_short = d.block_ids[..., : -(-short // block_sizes[1])]
    p_short = p.block_ids[..., : -(-short // block_sizes[0])]
    for got, want in zip(indexer.indices(d_short, p_short, short),
                         request_indices(plan, d_short, p_short, short), strict=True):
        assert np.array_equal(got, want)
    for got, want in zip(indexer.indices(d.block_ids, p.block_ids, n), (local_idx, remote_idx), strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize(
    "layouts,total,tps,block_sizes",
    [
        (("flashinfer-hnd", "flashinfer-hnd"), 8, (1, 2), (16, 16)),
        (("flashinfer-hnd", "flashinfer-hnd"), 8, (2, 1), (16, 16)),
        (("flashinfer-hnd", "packed"), 2, (4, 2), (16, 32)),
        (("packed", "flashinfer-hnd"), 4, (2, 8), (32, 16)),
        (("trtllm-hnd", "flash-attn-nhd"), 4, (4, 4), (8, 16)),
        (("mla", "mla"), 1, (2, 4), (16, 64)),
        (("kvlast-hnd", "kvlast-hnd"), 4, (1, 2), (16, 32)),
        (("kvlast-hnd", "kvlast-hbnd"), 4, (2, 1), (32, 16)),
        (("kvlast-nhd", "packed"), 2, (2, 2), (16, 16)),
    ],
)
def test_named_cases(layouts, total, tps, block_sizes):
    for read in (True, False):
        run_scenario(dict(layouts=layouts, total=total, prefill_tp=tps[0], decode_tp=tps[1],
                          block_sizes=block_sizes, num_layers=2, head_dim=4, dtype="float16",
                          num_tokens=37, extra_blocks=3, contiguous_layers=False, read=read, seed=7))
        run_scenario(dict(layouts=layouts, total=total, prefill_tp=tps[0], decode_tp=tps[1],
                          block_sizes=block_sizes, num_layers=3, head_dim=4, dtype="float32",
                          num_tokens=37, extra_blocks=3, contiguous_layers=False, interleaved=True,
                          read=read, seed=8))
