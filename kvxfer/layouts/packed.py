"""Packed K/V: `[num_blocks, H, block_size, 2*D]`, where each (block, head) holds its
`block_size` K rows and then its `block_size` V rows (the last two dimensions are a reshaped
`[2, block_size, D]`).

vLLM's CPU attention backend (CPU_ATTN) hands exactly this tensor to a KV connector. One head of
one block is a single contiguous run holding both K and V, so whole-head slices stay one span per
block, and a K or V half alone is `block_size * D` contiguous elements.
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


def _tensor_strides(g: Geometry, strides: tuple[int, ...], item: int) -> RowStrides:
    # kv: [num_blocks, H, block_size, 2*D] read as [num_blocks, H, 2, block_size, D]: that needs
    # each (block, head) plane of block_size * 2*D elements dense
    block, head, token2, dim = strides
    row = g.head_dim * item
    if (g.head_dim > 1 and dim != item) or (g.block_size > 1 and token2 != 2 * row):
        raise LayoutError(f"packed: strides {strides} (bytes) do not make each (block, head) plane "
                          f"of {g.block_size} x {2 * g.head_dim} elements dense")
    return RowStrides(block=block, kv=g.block_size * row, head=head, token=row)


def _strides(g: Geometry, row: int) -> RowStrides:
    # kv: [num_blocks, H, block_size, 2*D], memory order [num_blocks, H, 2, block_size, D]
    return RowStrides(block=g.num_heads * 2 * g.block_size * row, kv=g.block_size * row,
                      head=2 * g.block_size * row, token=row)


PACKED = LayoutSpec(
    name="packed",
    summary="[num_blocks, H, block_size, 2*D]",
    shape=lambda g: (g.num_blocks, g.num_heads, g.block_size, 2 * g.head_dim),
    parse_shape=_parse,
    strides=_strides,
    tensor_strides=_tensor_strides,
)
