"""The shape of a layout module: how a layout names its tensor shape and where its rows live."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvxfer.errors import LayoutError
from kvxfer.layouts.base import RowStrides


@dataclass(frozen=True)
class Geometry:
    """One layer's cache geometry, independent of dtype (strides are counted in rows' bytes)."""

    num_blocks: int
    block_size: int
    num_heads: int
    head_dim: int


# (geometry, byte stride of each tensor axis, item bytes) -> where rows live
TensorStrides = Callable[[Geometry, tuple[int, ...], int], RowStrides]


@dataclass(frozen=True)
class LayoutSpec:
    name: str
    summary: str
    shape: Callable[[Geometry], tuple[int, ...]]
    parse_shape: Callable[[tuple[int, ...]], Geometry]
    strides: Callable[[Geometry, int], RowStrides]  # (geometry, row_bytes) -> byte strides, dense
    tensor_strides: TensorStrides  # the same read off a tensor's own strides (padded, interleaved)
    separate_kv_pages: bool = False
    has_v: bool = True


def axis_strides(*roles: str) -> TensorStrides:
    """Row strides read off a tensor whose axes play `roles`, one per axis: "block", "kv", "head",
    "token", "dim" (a row's elements), or "kv|dim" (the last axis holds the K row, then the V
    row). An axis that is absent has stride 0 (kv) or the block's (head: one head per block)."""

    def read(g: Geometry, strides: tuple[int, ...], item: int) -> RowStrides:
        by_role = dict(zip(roles, strides, strict=True))
        dim = by_role.get("dim", by_role.get("kv|dim"))
        if g.head_dim > 1 and dim != item:
            raise LayoutError(f"head_dim axis has stride {dim} bytes, not {item}: rows are not contiguous")
        kv = g.head_dim * item if "kv|dim" in by_role else by_role.get("kv", 0)
        return RowStrides(block=by_role["block"], kv=kv, head=by_role.get("head", by_role["block"]),
                          token=by_role["token"])

    return read
