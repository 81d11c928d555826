"""Packed K/V: `[num_blocks, H, block_size, 2*D]`, each token's K row followed by its V row.

vLLM's CPU attention backend hands exactly this tensor to a KV connector. One head of one block is
a single contiguous run holding both K and V, so whole-head slices stay one span per block.
"""

from __future__ import annotations

from kvxfer.errors import LayoutError
from kvxfer.layouts.base import RowStrides
from kvxfer.layouts.spec import Geometry, LayoutSpec


def _parse(shape: tuple[int, ...]) -> Geometry:
    if len(shape) != 4 or shape[3] % 2:
        raise LayoutError(f"packed: shape {shape} is not [num_blocks, H, block_size, 2*D]")
    n, h, b, d2 = shape
    return Geometry(n, b, h, d2 // 2)


def _strides(g: Geometry, row: int) -> RowStrides:
    # kv: [num_blocks, H, block_size, 2*D]
    return RowStrides(block=g.num_heads * g.block_size * 2 * row, kv=row,
                      head=g.block_size * 2 * row, token=2 * row)


PACKED = LayoutSpec(
    name="packed",
    summary="[num_blocks, H, block_size, 2*D]",
    shape=lambda g: (g.num_blocks, g.num_heads, g.block_size, 2 * g.head_dim),
    parse_shape=_parse,
    strides=_strides,
)
