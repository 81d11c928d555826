"""MLA (DeepSeek-style): one latent vector per token, `[num_blocks, block_size, D_latent]`.

No heads and no separate V: every TP rank holds the whole latent, so a decode rank reads it from
one prefill rank (the planner spreads decode ranks over prefill ranks). Heads are modelled as one
replicated "head" so the TP mapping needs no special case.
"""

from __future__ import annotations

from kvxfer.errors import LayoutError
from kvxfer.layouts.base import RowStrides
from kvxfer.layouts.spec import Geometry, LayoutSpec, axis_strides


def _parse(shape: tuple[int, ...]) -> Geometry:
    if len(shape) != 3:
        raise LayoutError(f"mla: shape {shape} is not [num_blocks, block_size, D_latent]")
    n, b, d = shape
    return Geometry(n, b, 1, d)


def _strides(g: Geometry, row: int) -> RowStrides:
    # latent: [num_blocks, block_size, D_latent]
    return RowStrides(block=g.block_size * row, kv=0, head=g.block_size * row, token=row)


MLA = LayoutSpec(
    name="mla",
    summary="[num_blocks, block_size, D_latent]",
    shape=lambda g: (g.num_blocks, g.block_size, g.head_dim),
    parse_shape=_parse,
    strides=_strides,
    tensor_strides=axis_strides("block", "token", "dim"),
    has_v=False,
)
