"""Each layout's byte strides address exactly the element its documented memory order says,
written out by hand here (independent of both kvxfer.layouts and kvxfer.verify); strides read
off a tensor (`describe_tensor`) agree with the dense ones, follow padding and interleaving, and
anything that cannot be a cache is refused with a LayoutError naming what does not fit."""

import numpy as np
import pytest
import torch

from kvxfer.errors import LayoutError
from kvxfer.layouts import ADOPTED_LAYOUTS, LAYOUTS, describe, describe_tensor
from kvxfer.verify import block_view

N, H, BS, D = 3, 2, 4, 5


def flat_index(layout, b, kv, h, t, d):
    """Where (block, kv, head, token, dim) lives in the per-layer tensor, by its documented order."""
    return {
        "flashinfer-hnd": (((b * 2 + kv) * H + h) * BS + t) * D + d,
        "flashinfer-nhd": (((b * 2 + kv) * BS + t) * H + h) * D + d,
        "flash-attn-hnd": (((kv * N + b) * H + h) * BS + t) * D + d,
        "flash-attn-nhd": (((kv * N + b) * BS + t) * H + h) * D + d,
        # vLLM CPU_ATTN: per (block, head), BS K rows then BS V rows
        "packed": (((b * H + h) * 2 + kv) * BS + t) * D + d,
        # vLLM >= 0.32 views: per token a K row, then a V row
        "kvlast-hnd": (((b * H + h) * BS + t) * 2 + kv) * D + d,
        "kvlast-nhd": (((b * BS + t) * H + h) * 2 + kv) * D + d,
        "kvlast-hbnd": (((h * N + b) * BS + t) * 2 + kv) * D + d,
    }[layout]


TWO_PLANE = ["flashinfer-hnd", "flashinfer-nhd", "flash-attn-hnd", "flash-attn-nhd", "packed",
             "kvlast-hnd", "kvlast-nhd", "kvlast-hbnd"]


@pytest.mark.parametrize("layout", TWO_PLANE)
def test_strides_and_torch_view_match_the_documented_order(layout):
    desc = describe(layout, num_layers=1, num_blocks=N, block_size=BS, num_heads=H, head_dim=D, dtype="float32")
    cache = torch.arange(int(np.prod(desc.shape)), dtype=torch.float32).view(desc.shape)
    view = block_view(layout, cache)  # [N, kv, H, BS, D]
    for b, kv, h, t in np.ndindex(N, 2, H, BS):
        want = flat_index(layout, b, kv, h, t, 0)
        got = (b * desc.block_stride + kv * desc.kv_stride + h * desc.head_stride + t * desc.token_stride) // 4
        assert got == want, (b, kv, h, t)
        assert int(view[b, kv, h, t, 0]) == want


def byte_strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(s * t.element_size() for s in t.stride())


@pytest.mark.parametrize("layout", sorted(LAYOUTS) + sorted(ADOPTED_LAYOUTS))
def test_strides_read_off_a_dense_tensor_are_the_dense_strides(layout):
    dense = describe(layout, num_layers=2, num_blocks=N, block_size=BS, num_heads=1 if layout == "mla" else H,
                     head_dim=D, dtype="float16")
    cache = torch.empty(dense.shape, dtype=torch.float16)
    read = describe_tensor(layout, tuple(cache.shape), byte_strides(cache), num_layers=2, dtype="float16")
    assert read == dense


@pytest.mark.parametrize("layout", TWO_PLANE)
def test_interleaved_blocks_keep_every_row_where_torch_sees_it(layout):
    """Blocks of 3 layers interleaved (vLLM's cross-layer BL* layouts): layer 1's tensor steps over
    the other layers' pages, and its rows are exactly where torch indexing finds them."""
    dense = describe(layout, num_layers=1, num_blocks=N, block_size=BS, num_heads=H, head_dim=D, dtype="float32")
    block_axis = 1 if layout.startswith("flash-attn") or layout == "kvlast-hbnd" else 0
    phys_shape = (N, 3, *[n for i, n in enumerate(dense.shape) if i != block_axis])
    arena = torch.arange(int(np.prod(phys_shape)), dtype=torch.float32).view(phys_shape)
    layer = arena[:, 1].movedim(0, block_axis)  # one layer, in the layout's axis order
    desc = describe_tensor(layout, tuple(layer.shape), byte_strides(layer), num_layers=3, dtype="float32")
    assert desc.block_stride == 3 * dense.block_bytes
    assert desc.layer_bytes == (N - 1) * desc.block_stride + dense.block_bytes
    view = block_view(layout, layer)
    base = layer.storage_offset()
    for b, kv, h, t in np.ndindex(N, 2, H, BS):
        at = (b * desc.block_stride + kv * desc.kv_stride + h * desc.head_stride + t * desc.token_stride) // 4
        assert int(view[b, kv, h, t, 0]) == int(arena.view(-1)[base + at]), (b, kv, h, t)


@pytest.mark.parametrize(
    "layout,shape,strides,message",
    [
        ("flashinfer-hnd", (N, 2, H, BS, D), (2 * H * BS * D * 4, H * BS * D * 4, BS * D * 4, D * 4, 8),
         "rows are not contiguous"),
        ("kvlast-hnd", (N, H, BS, 2 * D), (H * BS * 2 * D * 4, BS * 2 * D * 4, D * 4, 4), "overlaps"),
        ("packed", (N, H, BS, 2 * D), (H * BS * 4 * D * 4, BS * 4 * D * 4, 4 * D * 4, 4), "dense"),
        ("flashinfer-nhd", (N, 2, BS, H, D), (4, 4, 4, 4), "do not fit"),
        ("kvlast-nhd", (N, BS, H, 2 * D + 1), (1, 1, 1, 1), "is not"),
    ],
)
def test_tensors_that_cannot_be_a_cache_are_refused(layout, shape, strides, message):
    with pytest.raises(LayoutError, match=message):
        describe_tensor(layout, shape, strides, num_layers=1, dtype="float32")
