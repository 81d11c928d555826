"""TRT-LLM style: one pool of pages, each page holding either K or V, `[num_pages, H, block_size,
D]` (HND) or `[num_pages, block_size, H, D]` (NHD). A sequence has separate K and V page ids
(FlashInfer's block tables `[batch, 2, max_pages]` with `uses_shared_paged_kv_idx=False`), so block
ids for this layout have shape [2, n]."""

from __future__ import annotations

from kvxfer.errors import LayoutError
from kvxfer.layouts.base import RowStrides
from kvxfer.layouts.spec import Geometry, LayoutSpec, axis_strides


def _parse(shape: tuple[int, ...], hnd: bool) -> Geometry:
    if len(shape) != 4:
        order = "H, block_size" if hnd else "block_size, H"
        raise LayoutError(f"trtllm: shape {shape} is not [num_pages, {order}, D]")
    n, a, b, d = shape
    return Geometry(n, b, a, d) if hnd else Geometry(n, a, b, d)


def _hnd_strides(g: Geometry, row: int) -> RowStrides:
    # pool: [num_pages, H, block_size, D]
    return RowStrides(block=g.num_heads * g.block_size * row, kv=0, head=g.block_size * row, token=row)


def _nhd_strides(g: Geometry, row: int) -> RowStrides:
    # pool: [num_pages, block_size, H, D]
    return RowStrides(block=g.block_size * g.num_heads * row, kv=0, head=row, token=g.num_heads * row)


HND = LayoutSpec(
    name="trtllm-hnd",
    summary="[num_pages, H, block_size, D], K and V page ids apart",
    shape=lambda g: (g.num_blocks, g.num_heads, g.block_size, g.head_dim),
    parse_shape=lambda s: _parse(s, hnd=True),
    strides=_hnd_strides,
    tensor_strides=axis_strides("block", "head", "token", "dim"),
    separate_kv_pages=True,
)

NHD = LayoutSpec(
    name="trtllm-nhd",
    summary="[num_pages, block_size, H, D], K and V page ids apart",
    shape=lambda g: (g.num_blocks, g.block_size, g.num_heads, g.head_dim),
    parse_shape=lambda s: _parse(s, hnd=False),
    strides=_nhd_strides,
    tensor_strides=axis_strides("block", "token", "head", "dim"),
    separate_kv_pages=True,
)
