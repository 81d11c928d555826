"""Cache layouts: where each (layer, block, K-or-V, head, token) row of a paged KV cache lives.

Pure numpy; importing this package never imports torch or NIXL. Caches are supported either as
one tensor per layer or as one tensor holding every layer (see `CacheRegion.layer_addrs`), dense
(`describe`) or with the strides of a tensor another engine hands over (`describe_tensor`).
"""

from __future__ import annotations

from kvxfer.errors import LayoutError
from kvxfer.layouts import flash_attn, flashinfer, kvlast, mla, packed, trtllm
from kvxfer.layouts.base import (
    DTYPE_BYTES,
    KV,
    CacheDesc,
    CacheRegion,
    Dim,
    RowStrides,
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

# Layouts kvxfer transfers but whose caches only other engines allocate and read (vLLM >= 0.32):
# kvxfer's own engine and daemons offer `LAYOUTS` only.
ADOPTED_LAYOUTS: dict[str, LayoutSpec] = {spec.name: spec for spec in (kvlast.HND, kvlast.NHD, kvlast.HBND)}


def get_layout(name: str) -> LayoutSpec:
    spec = LAYOUTS.get(name) or ADOPTED_LAYOUTS.get(name)
    if spec is None:
        raise LayoutError(f"layout={name!r} is not one of {sorted(LAYOUTS) + sorted(ADOPTED_LAYOUTS)}")
    return spec


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
    geometry = Geometry(num_blocks, block_size, num_heads, head_dim)
    shape = spec.shape(geometry)
    strides = spec.strides(geometry, head_dim * _item_bytes(dtype))
    layer_bytes = _item_bytes(dtype)
    for extent in shape:
        layer_bytes *= extent
    return _desc(spec, geometry, shape, strides, layer_bytes, num_layers=num_layers, dtype=dtype,
                 first_head=first_head, total_heads=total_heads)


def describe_tensor(
    layout: str,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    *,
    num_layers: int,
    dtype: str,
    first_head: int = 0,
    total_heads: int | None = None,
) -> CacheDesc:
    """The description of a cache handed over as per-layer tensors of `shape` with `strides` (in
    bytes, per axis: the tensor's own, which may be padded or interleave other layers' blocks).
    `shape` is in the layout's axis order; `layer_bytes` is what the strided tensor spans."""
    spec = get_layout(layout)
    shape, strides = tuple(int(x) for x in shape), tuple(int(x) for x in strides)
    if len(strides) != len(shape) or min(strides, default=0) < 0:
        raise LayoutError(f"{layout}: strides {strides} do not fit shape {shape}")
    geometry = spec.parse_shape(shape)
    item = _item_bytes(dtype)
    rows = spec.tensor_strides(geometry, strides, item)
    layer_bytes = item + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    return _desc(spec, geometry, shape, rows, layer_bytes, num_layers=num_layers, dtype=dtype,
                 first_head=first_head, total_heads=total_heads)


def _item_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise LayoutError(f"dtype={dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _desc(spec: LayoutSpec, g: Geometry, shape: tuple[int, ...], rows: RowStrides, layer_bytes: int, *,
          num_layers: int, dtype: str, first_head: int, total_heads: int | None) -> CacheDesc:
    if not spec.has_v and (g.num_heads != 1 or (total_heads or 1) != 1):
        raise LayoutError(f"layout={spec.name!r} holds one latent per token: num_heads={g.num_heads} must be 1")
    desc = CacheDesc(
        layout=spec.name,
        num_layers=num_layers,
        num_blocks=g.num_blocks,
        block_size=g.block_size,
        num_heads=g.num_heads,
        first_head=first_head,
        total_heads=g.num_heads if total_heads is None else total_heads,
        head_dim=g.head_dim,
        dtype=dtype,
        shape=shape,
        block_stride=rows.block,
        kv_stride=rows.kv,
        head_stride=rows.head,
        token_stride=rows.token,
        layer_bytes=layer_bytes,
        separate_kv_pages=spec.separate_kv_pages,
        has_v=spec.has_v,
    )
    validate_desc(desc, who=spec.name)
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
    "ADOPTED_LAYOUTS",
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
    "check_block_ids",
    "describe",
    "describe_shape",
    "describe_tensor",
    "get_layout",
    "num_blocks_for",
    "row_strides",
    "spans_array",
    "validate_desc",
]
