"""The shape of a layout module: how a layout names its tensor shape and where its rows live."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvxfer.layouts.base import RowStrides


@dataclass(frozen=True)
class Geometry:
    """One layer's cache geometry, independent of dtype (strides are counted in rows' bytes)."""

    num_blocks: int
    block_size: int
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class LayoutSpec:
    name: str
    summary: str
    shape: Callable[[Geometry], tuple[int, ...]]
    parse_shape: Callable[[tuple[int, ...]], Geometry]
    strides: Callable[[Geometry, int], RowStrides]  # (geometry, row_bytes) -> byte strides
    separate_kv_pages: bool = False
    has_v: bool = True
