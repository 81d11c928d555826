"""FlashAttention-style planes: `[2, num_blocks, block_size, H, D]` (NHD) or
`[2, num_blocks, H, block_size, D]` (HND). The K plane comes first, then the V plane."""

from __future__ import annotations

from kvxfer.errors import LayoutError
from kvxfer.layouts.base import RowStrides
from kvxfer.layouts.spec import Geometry, LayoutSpec, axis_strides


def _parse(shape: tuple[int, ...], hnd: bool) -> Geometry:
    if len(shape) != 5 or shape[0] != 2:
        order = "H, block_size" if hnd else "block_size, H"
        raise LayoutError(f"flash-attn: shape {shape} is not [2, num_blocks, {order}, D]")
    _, n, a, b, d = shape
    return Geometry(n, b, a, d) if hnd else Geometry(n, a, b, d)


def _hnd_strides(g: Geometry, row: int) -> RowStrides:
    # kv: [2, num_blocks, H, block_size, D]
    block = g.num_heads * g.block_size * row
    return RowStrides(block=block, kv=g.num_blocks * block, head=g.block_size * row, token=row)


def _nhd_strides(g: Geometry, row: int) -> RowStrides:
    # kv: [2, num_blocks, block_size, H, D]
    block = g.block_size * g.num_heads * row
    return RowStrides(block=block, kv=g.num_blocks * block, head=row, token=g.num_heads * row)


HND = LayoutSpec(
    name="flash-attn-hnd",
    summary="[2, num_blocks, H, block_size, D]",
    shape=lambda g: (2, g.num_blocks, g.num_heads, g.block_size, g.head_dim),
    parse_shape=lambda s: _parse(s, hnd=True),
    strides=_hnd_strides,
    tensor_strides=axis_strides("kv", "block", "head", "token", "dim"),
)

NHD = LayoutSpec(
    name="flash-attn-nhd",
    summary="[2, num_blocks, block_size, H, D]",
    shape=lambda g: (2, g.num_blocks, g.block_size, g.num_heads, g.head_dim),
    parse_shape=lambda s: _parse(s, hnd=False),
    strides=_nhd_strides,
    tensor_strides=axis_strides("kv", "block", "token", "head", "dim"),
)
