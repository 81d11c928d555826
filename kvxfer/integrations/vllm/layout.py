"""vLLM CPU_ATTN's cache layout, until kvxfer.layouts describes it (then this module goes).

The backend hands each layer as `[num_blocks, H, block_size, 2*D]`, but reads it as
`[num_blocks, H, 2*block_size, D]` split in halves: per (block, head), a K half then a V half
(vllm/v1/attention/backends/cpu_attn.py: `kv_cache.view(N, H, 2 * block_size, D).chunk(2, dim=2)`).
kvxfer's `packed` layout assumes each token's K row followed by its V row instead.

Inside a half, the order of tokens is the kernel's own (`cpu_attn_reshape_and_cache`, per ISA):
measured, a producer with block_size 64 feeding a consumer with 128 gives wrong tokens through these
row strides, while equal block sizes give exact ones. So only whole (block, head) regions are
portable: any TP split (whole heads) works, block-size conversion does not, and the consumer
refuses a producer of another block size at handshake (`Consumer._check_whole_blocks`). The row
strides below are right for the halves and for whole blocks, which is all that is ever moved.
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
