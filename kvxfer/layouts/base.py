"""Cache geometry shared by every layout: the description that crosses the wire, and span math.

Every supported cache is, per layer, a strided array of *rows*: one row is `head_dim` contiguous
elements of one (block, K-or-V, head, token). A layout module only says where rows live (four byte
strides); everything else here is layout-independent arithmetic on those strides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import msgspec
import numpy as np

from kvxfer.errors import LayoutError

DTYPE_BYTES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
}


class KV(IntEnum):
    K = 0
    V = 1


class CacheDesc(msgspec.Struct, frozen=True, kw_only=True):
    """What a peer must know about one rank's cache to compute byte spans in it.

    Serialised into the handshake. Strides are in bytes, per layer tensor; `layer_bytes` is the
    size of one layer's region. New fields get defaults and are appended (schema evolution).
    """

    layout: str
    num_layers: int
    num_blocks: int
    block_size: int
    num_heads: int  # KV heads held by this rank (1 for MLA's latent)
    first_head: int  # global index of this rank's first head
    total_heads: int  # KV heads of the whole model
    head_dim: int
    dtype: str
    shape: tuple[int, ...]  # one layer's tensor shape
    block_stride: int
    kv_stride: int  # 0 where K and V live on separate pages (TRT-LLM)
    head_stride: int
    token_stride: int
    layer_bytes: int
    separate_kv_pages: bool = False
    has_v: bool = True

    @property
    def item_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def row_bytes(self) -> int:
        return self.head_dim * self.item_bytes

    @property
    def num_kv(self) -> int:
        return 2 if self.has_v else 1

    @property
    def heads(self) -> tuple[int, int]:
        return (self.first_head, self.first_head + self.num_heads)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's K (and V) over all held heads, excluding padding."""
        return self.num_kv * self.num_heads * self.block_size * self.row_bytes


@dataclass(frozen=True)
class RowStrides:
    """Byte strides of one row's coordinates inside one layer tensor."""

    block: int
    kv: int
    head: int
    token: int


@dataclass(frozen=True)
class CacheRegion:
    """A cache description plus where its layers live: everything needed to make addresses.

    `layer_addrs[l]` is the address (or, in tests, the offset) of layer l. One tensor per layer
    gives unrelated addresses; one tensor holding every layer gives `base + l * layer_bytes`.
    Both are supported: the planner only ever adds offsets to `layer_addrs`.
    """

    desc: CacheDesc
    layer_addrs: np.ndarray  # [num_layers] uint64
    device_id: int = 0

    def __post_init__(self) -> None:
        addrs = np.asarray(self.layer_addrs, dtype=np.uint64)
        object.__setattr__(self, "layer_addrs", addrs)
        if addrs.shape != (self.desc.num_layers,):
            raise LayoutError(
                f"layer_addrs has shape {addrs.shape}, expected ({self.desc.num_layers},) for "
                f"num_layers={self.desc.num_layers}"
            )


def validate_desc(desc: CacheDesc, *, who: str = "cache") -> None:
    """Check that a (possibly remote) description is self-consistent and in bounds.

    A remote peer's description decides where we read and write: strides that point past
    `layer_bytes` would let a plan touch memory outside the registered region.
    """
    positive = {
        "num_layers": desc.num_layers,
        "num_blocks": desc.num_blocks,
        "block_size": desc.block_size,
        "num_heads": desc.num_heads,
        "total_heads": desc.total_heads,
        "head_dim": desc.head_dim,
    }
    for field, value in positive.items():
        if value <= 0:
            raise LayoutError(f"{who}: {field}={value} must be positive")
    if desc.dtype not in DTYPE_BYTES:
        raise LayoutError(f"{who}: dtype={desc.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    if not 0 <= desc.first_head < desc.first_head + desc.num_heads <= desc.total_heads:
        raise LayoutError(
            f"{who}: heads [{desc.first_head}, {desc.first_head + desc.num_heads}) outside "
            f"[0, {desc.total_heads}) (total_heads={desc.total_heads})"
        )
    for field in ("block_stride", "kv_stride", "head_stride", "token_stride", "layer_bytes"):
        if getattr(desc, field) < 0:
            raise LayoutError(f"{who}: {field}={getattr(desc, field)} must not be negative")
    last_row = (
        (desc.num_blocks - 1) * desc.block_stride
        + (desc.num_kv - 1) * desc.kv_stride
        + (desc.num_heads - 1) * desc.head_stride
        + (desc.block_size - 1) * desc.token_stride
    )
    if last_row + desc.row_bytes > desc.layer_bytes:
        raise LayoutError(
            f"{who}: strides reach byte {last_row + desc.row_bytes} but layer_bytes="
            f"{desc.layer_bytes}"
        )
    _check_disjoint(desc, who)


def _check_disjoint(desc: CacheDesc, who: str) -> None:
    """No two rows may share a byte: a plan writing one row would overwrite another. Sufficient
    test: taken by increasing stride, each coordinate must step past everything the finer ones
    span. Separate-page layouts keep K and V on different pages, so their kv stride is 0."""
    coords = [("block", desc.block_stride, desc.num_blocks), ("head", desc.head_stride, desc.num_heads),
              ("token", desc.token_stride, desc.block_size)]
    if not desc.separate_kv_pages:
        coords.append(("kv", desc.kv_stride, desc.num_kv))
    reach = desc.row_bytes
    for name, stride, extent in sorted((c for c in coords if c[2] > 1), key=lambda c: c[1]):
        if stride < reach:
            raise LayoutError(f"{who}: {name}_stride={stride} overlaps rows that span {reach} bytes "
                              f"(block={desc.block_stride}, kv={desc.kv_stride}, head={desc.head_stride}, "
                              f"token={desc.token_stride}, row={desc.row_bytes})")
        reach = stride * (extent - 1) + reach


def row_strides(desc: CacheDesc) -> RowStrides:
    return RowStrides(desc.block_stride, desc.kv_stride, desc.head_stride, desc.token_stride)


def check_block_ids(ids: np.ndarray, desc: CacheDesc, *, who: str) -> np.ndarray:
    """Block ids as int64, refusing anything out of range or repeated."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise LayoutError(f"{who}: block ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= desc.num_blocks:
            bad = lo if lo < 0 else hi
            raise LayoutError(
                f"{who}: block id {bad} outside [0, {desc.num_blocks}) (num_blocks={desc.num_blocks})"
            )
    return ids


@dataclass(frozen=True)
class Dim:
    """A logical coordinate of rows with its extent and its byte stride on each side."""

    name: str
    extent: int
    strides: tuple[int, ...]


def merge_contiguous(dims: list[Dim], row_bytes: int) -> tuple[int, list[Dim]]:
    """Grow a contiguous unit from one row by absorbing every dim that continues it on all sides.

    Returns the unit's byte length and the dims left over (in their given order), which become
    separate spans. A dim continues the unit when its stride equals the unit's length on every
    side, i.e. the next element starts exactly where the unit ends.
    """
    unit, left = row_bytes, [d for d in dims if d.extent > 1]
    grew = True
    while grew:
        grew = False
        for dim in left:
            if all(stride == unit for stride in dim.strides):
                unit *= dim.extent
                left.remove(dim)
                grew = True
                break
    return unit, left


def ids_per_kv(ids: np.ndarray, desc: CacheDesc) -> np.ndarray:
    """[num_kv, n] page ids: shared layouts repeat the block ids for V."""
    if desc.separate_kv_pages:
        if ids.ndim != 2 or ids.shape[0] != 2:
            raise LayoutError(
                f"{desc.layout}: block ids need shape [2, n] (K pages, V pages), got {ids.shape}"
            )
        return ids
    if ids.ndim != 1:
        raise LayoutError(f"{desc.layout}: block ids need shape [n], got {ids.shape}")
    return np.broadcast_to(ids, (desc.num_kv, ids.size))


def spans_array(addrs: np.ndarray, length: int | np.ndarray, device_id: int) -> np.ndarray:
    """Pack addresses and lengths into NIXL's `(N, 3)` uint64 (address, length, device) form."""
    out = np.empty((addrs.size, 3), dtype=np.uint64)
    out[:, 0] = addrs
    out[:, 1] = length
    out[:, 2] = device_id
    return out


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
