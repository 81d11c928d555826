"""vLLM CPU_ATTN's cache layout, until kvxfer.layouts describes it (then this module goes).

The backend hands each layer as `[num_blocks, H, block_size, 2*D]`, but reads it as
`[num_blocks, H, 2*block_size, D]` split in halves: per (block, head), the K rows of all
block_size tokens, then their V rows (vllm/v1/attention/backends/cpu_attn.py:
`kv_cache.view(N, H, 2 * block_size, D).chunk(2, dim=2)`). kvxfer's `packed` layout assumes each
token's K row followed by its V row instead. The two agree on whole blocks, byte for byte, so equal
block sizes on both sides transfer correctly either way; converting block sizes moves parts of
blocks and needs the true strides below.
"""

from __future__ import annotations

from kvxfer.layouts import LAYOUTS, RowStrides
from kvxfer.layouts.packed import PACKED
from kvxfer.layouts.spec import Geometry, LayoutSpec

NAME = "vllm-cpu"


def _strides(g: Geometry, row: int) -> RowStrides:
    # kv: [num_blocks, H, 2, block_size, D]
    return RowStrides(block=g.num_heads * 2 * g.block_size * row, kv=g.block_size * row,
                      head=2 * g.block_size * row, token=row)


VLLM_CPU = LayoutSpec(
    name=NAME,
    summary="[num_blocks, H, block_size, 2*D] read as [num_blocks, H, 2, block_size, D] (vLLM CPU_ATTN)",
    shape=PACKED.shape,
    parse_shape=PACKED.parse_shape,
    strides=_strides,
)


def register() -> str:
    """Make the layout known to `kvxfer.layouts.describe*` (idempotent); returns its name."""
    LAYOUTS.setdefault(NAME, VLLM_CPU)
    return NAME
