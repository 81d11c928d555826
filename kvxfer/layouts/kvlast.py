"""K and V side by side in the last dimension: each token's K row, then its V row (vLLM >= 0.32
hands every dense GPU backend a per-layer view `[num_blocks, H, block_size, Dk + Dv]` over one
buffer; its physical order is vLLM's KVCacheLayout).

Named by physical axis order: `kvlast-hnd` `[num_blocks, H, block_size, 2*D]` (LBHNC, and the
cross-layer BLHNC / BHLNC with larger strides), `kvlast-nhd` `[num_blocks, block_size, H, 2*D]`
(LBNHC, BLNHC), `kvlast-hbnd` `[H, num_blocks, block_size, 2*D]` (LHBNC). K and V rows of a
token are adjacent, so one span carries both; in HND a head slice of a block is one span.
"""

from __future__ import annotations

from kvxfer.errors import LayoutError
from kvxfer.layouts.base import RowStrides
from kvxfer.layouts.spec import Geometry, LayoutSpec, axis_strides

_AXES = {"hnd": "num_blocks, H, block_size", "nhd": "num_blocks, block_size, H", "hbnd": "H, num_blocks, block_size"}


def _parse(shape: tuple[int, ...], order: str) -> Geometry:
    if len(shape) != 4 or shape[3] % 2:
        raise LayoutError(f"kvlast-{order}: shape {shape} is not [{_AXES[order]}, 2*D]")
    a, b, c, d2 = shape
    if order == "hnd":
        return Geometry(a, c, b, d2 // 2)
    if order == "nhd":
        return Geometry(a, b, c, d2 // 2)
    return Geometry(b, c, a, d2 // 2)


def _hnd_strides(g: Geometry, row: int) -> RowStrides:
    # kv: [num_blocks, H, block_size, 2, D]
    return RowStrides(block=g.num_heads * g.block_size * 2 * row, kv=row, head=g.block_size * 2 * row,
                      token=2 * row)


def _nhd_strides(g: Geometry, row: int) -> RowStrides:
    # kv: [num_blocks, block_size, H, 2, D]
    return RowStrides(block=g.block_size * g.num_heads * 2 * row, kv=row, head=2 * row,
                      token=g.num_heads * 2 * row)


def _hbnd_strides(g: Geometry, row: int) -> RowStrides:
    # kv: [H, num_blocks, block_size, 2, D]
    return RowStrides(block=g.block_size * 2 * row, kv=row, head=g.num_blocks * g.block_size * 2 * row,
                      token=2 * row)


HND = LayoutSpec(
    name="kvlast-hnd",
    summary="[num_blocks, H, block_size, 2*D], per token K then V",
    shape=lambda g: (g.num_blocks, g.num_heads, g.block_size, 2 * g.head_dim),
    parse_shape=lambda s: _parse(s, "hnd"),
    strides=_hnd_strides,
    tensor_strides=axis_strides("block", "head", "token", "kv|dim"),
)

NHD = LayoutSpec(
    name="kvlast-nhd",
    summary="[num_blocks, block_size, H, 2*D], per token K then V",
    shape=lambda g: (g.num_blocks, g.block_size, g.num_heads, 2 * g.head_dim),
    parse_shape=lambda s: _parse(s, "nhd"),
    strides=_nhd_strides,
    tensor_strides=axis_strides("block", "token", "head", "kv|dim"),
)

HBND = LayoutSpec(
    name="kvlast-hbnd",
    summary="[H, num_blocks, block_size, 2*D], per token K then V",
    shape=lambda g: (g.num_heads, g.num_blocks, g.block_size, 2 * g.head_dim),
    parse_shape=lambda s: _parse(s, "hbnd"),
    strides=_hbnd_strides,
    tensor_strides=axis_strides("head", "block", "token", "kv|dim"),
)
