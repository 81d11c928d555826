"""Cache layouts: where each (layer, block, K-or-V, head, token) row of a paged KV cache lives.

Pure numpy; importing this package never imports torch or NIXL. Caches are supported either as
one tensor per layer or as one tensor holding every layer (see `CacheRegion.layer_addrs`).
"""

from __future__ import annotations

from kvxfer.errors import LayoutError
from kvxfer.layouts import flash_attn, flashinfer, mla, packed, trtllm
from kvxfer.layouts.base import (
    DTYPE_BYTES,
    KV,
    CacheDesc,
    CacheRegion,
    Dim,
    RowStrides,
    block_spans,
    check_block_ids,
    ids_per_kv,
    merge_contiguous,
    num_blocks_for,
    row_strides,
    spans_array,
    validate_desc,
)
from kvxfer.layouts.spec import Geometry, LayoutSpec

LAYOUTS: dict[str, LayoutSpec] = {
    spec.name: spec
    for spec in (
        flashinfer.HND,
        flashinfer.NHD,
        flash_attn.HND,
        flash_attn.NHD,
        packed.PACKED,
        trtllm.HND,
        trtllm.NHD,
        mla.MLA,
    )
}


def get_layout(name: str) -> LayoutSpec:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise LayoutError(f"layout={name!r} is not one of {sorted(LAYOUTS)}") from None


def describe(
    layout: str,
    *,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_heads: int,
    head_dim: int,
    dtype: str,
    first_head: int = 0,
    total_heads: int | None = None,
) -> CacheDesc:
    """The description of one rank's cache (every layer the same shape)."""
    spec = get_layout(layout)
    if not spec.has_v and (num_heads != 1 or (total_heads or 1) != 1):
        raise LayoutError(f"layout={layout!r} holds one latent per token: num_heads={num_heads} must be 1")
    if dtype not in DTYPE_BYTES:
        raise LayoutError(f"dtype={dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    geometry = Geometry(num_blocks, block_size, num_heads, head_dim)
    row = head_dim * DTYPE_BYTES[dtype]
    strides = spec.strides(geometry, row)
    shape = spec.shape(geometry)
    layer_bytes = DTYPE_BYTES[dtype]
    for extent in shape:
        layer_bytes *= extent
    desc = CacheDesc(
        layout=layout,
        num_layers=num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_heads=num_heads,
        first_head=first_head,
        total_heads=num_heads if total_heads is None else total_heads,
        head_dim=head_dim,
        dtype=dtype,
        shape=shape,
        block_stride=strides.block,
        kv_stride=strides.kv,
        head_stride=strides.head,
        token_stride=strides.token,
        layer_bytes=layer_bytes,
        separate_kv_pages=spec.separate_kv_pages,
        has_v=spec.has_v,
    )
    validate_desc(desc, who=layout)
    return desc


def describe_shape(
    layout: str,
    shape: tuple[int, ...],
    *,
    num_layers: int,
    dtype: str,
    first_head: int = 0,
    total_heads: int | None = None,
) -> CacheDesc:
    """The description of a cache whose per-layer tensor has `shape` (e.g. one handed over by an
    inference engine). The shape must be exactly what the layout produces."""
    g = get_layout(layout).parse_shape(tuple(int(x) for x in shape))
    return describe(
        layout,
        num_layers=num_layers,
        num_blocks=g.num_blocks,
        block_size=g.block_size,
        num_heads=g.num_heads,
        head_dim=g.head_dim,
        dtype=dtype,
        first_head=first_head,
        total_heads=total_heads,
    )


__all__ = [
    "DTYPE_BYTES",
    "KV",
    "LAYOUTS",
    "CacheDesc",
    "CacheRegion",
    "Geometry",
    "LayoutSpec",
    "Dim",
    "RowStrides",
    "ids_per_kv",
    "merge_contiguous",
    "block_spans",
    "check_block_ids",
    "describe",
    "describe_shape",
    "get_layout",
    "num_blocks_for",
    "row_strides",
    "spans_array",
    "validate_desc",
]
