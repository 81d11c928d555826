"""One rank's paged KV cache (one tensor per layer, in a kvxfer layout) and its block allocator.

Blocks are reference counted: `allocate` gives a request one reference per block and `free`
drops it; a transfer lease takes its own reference with `hold` and drops it with `release`, so a
prefill rank can finish a request and still keep its blocks until every reader is done.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kvxfer.engine.config import CacheConfig, ModelConfig
from kvxfer.errors import AllocationError
from kvxfer.layouts import CacheDesc, Geometry, describe, get_layout
from kvxfer.planning import HeadRange


class BlockAllocator:
    """Free list plus reference counts over block ids [0, num_blocks)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks, each with one reference (the request's)."""
        if not self.can_allocate(num_blocks):
            raise AllocationError(f"allocate: {num_blocks} blocks asked, {len(self._free)} of "
                                  f"{self.num_blocks} free")
        ids = [self._free.popleft() for _ in range(num_blocks)]
        for block in ids:
            self._refs[block] = 1
        return ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop the request's reference; a block returns to the free list at zero references."""
        self._drop(block_ids, verb="free")

    def hold(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on allocated blocks (a transfer lease keeps them alive)."""
        ids = self._checked(block_ids, verb="hold")
        for block in ids:
            self._refs[block] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop a reference taken by `hold`."""
        self._drop(block_ids, verb="release")

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def _checked(self, block_ids: Iterable[int], *, verb: str) -> list[int]:
        ids = [int(b) for b in block_ids]
        for block in ids:
            if not 0 <= block < self.num_blocks:
                raise AllocationError(f"{verb}: block {block} outside [0, {self.num_blocks})")
            if self._refs[block] == 0:
                raise AllocationError(f"{verb}: block {block} is not allocated")
        return ids

    def _drop(self, block_ids: Iterable[int], *, verb: str) -> None:
        ids = self._checked(block_ids, verb=verb)
        if len(set(ids)) != len(ids):
            raise AllocationError(f"{verb}: block ids {ids} repeat a block")
        for block in ids:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)


@dataclass(frozen=True)
class KVCache:
    """Per-layer cache tensors of one rank and the description peers use to address them."""

    desc: CacheDesc
    layers: list[torch.Tensor]  # each: desc.shape, e.g. [num_blocks, 2, H, block_size, D]

    @classmethod
    def allocate(cls, model: ModelConfig, cache: CacheConfig, kv_heads: HeadRange, *,
                 dtype: torch.dtype, device: torch.device) -> KVCache:
        spec = get_layout(cache.layout)
        shape = spec.shape(Geometry(cache.num_blocks, cache.block_size, kv_heads.size, model.head_dim))
        desc = describe(
            cache.layout, num_layers=model.num_layers, num_blocks=cache.num_blocks,
            block_size=cache.block_size, num_heads=kv_heads.size, first_head=kv_heads.start,
            total_heads=model.num_kv_heads, head_dim=model.head_dim,
            dtype=str(dtype).removeprefix("torch."),
        )
        layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
        return cls(desc, layers)

    @property
    def layer_addrs(self) -> list[int]:
        """Address of each layer tensor (what NIXL registers)."""
        return [t.data_ptr() for t in self.layers]
