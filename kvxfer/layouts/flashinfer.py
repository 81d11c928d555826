"""FlashInfer's single-tensor paged cache: `[num_blocks, 2, H, block_size, D]` (HND) or
`[num_blocks, 2, block_size, H, D]` (NHD).

HND keeps each head's tokens of a block contiguous, so a rank owning heads [a, b) reads the K half
and the V half of a block as two spans of `(b-a) * block_size * D` elements: the virtual split.
NHD interleaves heads inside every token; a head slice is then one span per token.
"""

from __future__ import annotations

from kvxfer.errors import LayoutError
from kvxfer.layouts.base import RowStrides
from kvxfer.layouts.spec import Geometry, LayoutSpec, axis_strides


def _parse(shape: tuple[int, ...], hnd: bool) -> Geometry:
    if len(shape) != 5 or shape[1] != 2:
        order = "H, block_size" if hnd else "block_size, H"
        raise LayoutError(f"flashinfer: shape {shape} is not [num_blocks, 2, {order}, D]")
    n, _, a, b, d = shape
    return Geometry(n, b, a, d) if hnd else Geometry(n, a, b, d)


def _hnd_strides(g: Geometry, row: int) -> RowStrides:
    # k: [num_blocks, 2, H, block_size, D]
    return RowStrides(block=2 * g.num_heads * g.block_size * row, kv=g.num_heads * g.block_size * row,
                      head=g.block_size * row, token=row)


def _nhd_strides(g: Geometry, row: int) -> RowStrides:
    # k: [num_blocks, 2, block_size, H, D]
    return RowStrides(block=2 * g.block_size * g.num_heads * row, kv=g.block_size * g.num_heads * row,
                      head=row, token=g.num_heads * row)


HND = LayoutSpec(
    name="flashinfer-hnd",
    summary="[num_blocks, 2, H, block_size, D]",
    shape=lambda g: (g.num_blocks, 2, g.num_heads, g.block_size, g.head_dim),
    parse_shape=lambda s: _parse(s, hnd=True),
    strides=_hnd_strides,
    tensor_strides=axis_strides("block", "kv", "head", "token", "dim"),
)

NHD = LayoutSpec(
    name="flashinfer-nhd",
    summary="[num_blocks, 2, block_size, H, D]",
    shape=lambda g: (g.num_blocks, 2, g.block_size, g.num_heads, g.head_dim),
    parse_shape=lambda s: _parse(s, hnd=False),
    strides=_nhd_strides,
    tensor_strides=axis_strides("block", "kv", "token", "head", "dim"),
)
