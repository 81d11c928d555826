"""vLLM's KV cache tensors -> what kvxfer registers with NIXL and the `CacheDesc` they share.

A layout is read off the tensors vLLM hands `register_kv_caches` (shape, strides, dtype,
storage), never assumed. What each vLLM version hands over (NOTES.md, "vLLM"):

| vLLM | backend | per-layer tensor (logical axes) | physical order |
| --- | --- | --- | --- |
| 0.25 | FLASHINFER, FLASH_ATTN, TRITON_ATTN | `[num_blocks, 2, block_size, H, D]` | HND or NHD (`VLLM_KV_CACHE_LAYOUT`, the connector's wish) |
| <= 0.11 | FLASH_ATTN | `[2, num_blocks, block_size, H, D]` | HND or NHD |
| 0.32+ | every dense GPU backend | `[num_blocks, H, block_size, Dk + Dv]` over one int8 buffer | vLLM's `KVCacheLayout`: LBHNC, LBNHC, LHBNC; BLHNC, BLNHC, BHLNC interleave layers per block |
| any | CPU_ATTN | `[num_blocks, H, block_size, 2 * D]` read as `[.., 2 * block_size, D]` | LBHNC only |
| 0.25 / 0.32+ | MLA backends | `[num_blocks, block_size, C]` / `[num_blocks, 1, block_size, C]` | |

Each tensor is permuted into the physical order of the kvxfer layout that matches it
(`kvxfer.layouts`), and its row strides are read from its own strides, so padding and other
layers' pages between blocks (cross-layer layouts) are followed. The views are in kernel blocks:
where vLLM's block size exceeds the kernel's, manager block b is kernel blocks b*r .. b*r+r-1
(`BlockMap`). Anything that fits no layout is refused with a LayoutError naming the backend,
shape and strides.

The worker calls `describe_vllm_caches` once in `register_kv_caches`: NIXL registers
`storages` (each allocation once), the region's layer addresses are `layer_addrs`, staging copies
address `windows`; `blocks` maps vLLM's block ids to the kernel ids the layout indexes.

Where block ids are translated: once per side, at the connector's edge, so the protocol roles
(kvxfer.agents) and every plan see kernel ids at the layout's block size only.
- Producer: the scheduler, as it signs the request's `TransferParams` (`request_finished`). The
  params carry kernel ids because the consumer's role pairs them with the producer's CacheDesc
  (kernel block size) it learns at handshake, and the signature covers them: nobody downstream
  could rewrite them. The scheduler has no tensors: each worker hands it the BlockMap read off its
  own (vLLM's start-up channel `get_handshake_metadata` -> `set_xfer_handshake_metadata`), so
  the kernel block size is derived once, from the tensors, and `common_block_map` checks ranks agree.
- Consumer: the worker, as a LoadJob (vLLM's manager ids) becomes the role's Load; the LoadJob
  keeps vLLM's ids, so a failed load reports exactly the blocks vLLM allocated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from kvxfer.errors import ConfigError, LayoutError
from kvxfer.layouts import CacheDesc, describe_tensor
from kvxfer.planning import heads_of_rank

log = logging.getLogger(__name__)


class Family(Enum):
    """How a backend's kernels read the tensor they are given."""

    DENSE = "dense"  # K and V as separate planes (<= 0.25) or side by side in the last dim (0.32+)
    CPU = "cpu"  # per (block, head): block_size K rows, then block_size V rows
    MLA = "mla"  # one latent per token


DENSE_BACKENDS = ("FLASHINFER", "FLASH_ATTN", "TRITON_ATTN")
CPU_BACKENDS = ("CPU_ATTN",)

# The layout that lets a decode rank read its heads of a block as one span whatever the two TP
# sizes (head-major; K and V adjacent per token in 0.32+). Both 0.25 ("HND") and 0.32+ (an alias
# of LBHNC) accept the name; it is also the only layout vLLM splits into kernel blocks everywhere.
REQUIRED_LAYOUT = "HND"

# Logical axes of each tensor form, by family and number of dims; "kv|dim" is a last axis holding
# the K row then the V row. Forms are tried in order (0.25's before the older FlashAttention one).
_FORMS: dict[tuple[Family, int], tuple[tuple[str, ...], ...]] = {
    (Family.DENSE, 5): (("block", "kv", "token", "head", "dim"), ("kv", "block", "token", "head", "dim")),
    (Family.DENSE, 4): (("block", "head", "token", "kv|dim"),),
    (Family.CPU, 4): (("block", "head", "token", "kv|dim"),),
    (Family.MLA, 3): (("block", "token", "dim"),),
    (Family.MLA, 4): (("block", "head", "token", "dim"),),
}

# kvxfer layout of each physical axis order, per family.
_LAYOUT_OF_ORDER: dict[Family, dict[tuple[str, ...], str]] = {
    Family.DENSE: {
        ("block", "kv", "head", "token", "dim"): "flashinfer-hnd",
        ("block", "kv", "token", "head", "dim"): "flashinfer-nhd",
        ("kv", "block", "head", "token", "dim"): "flash-attn-hnd",
        ("kv", "block", "token", "head", "dim"): "flash-attn-nhd",
        ("block", "head", "token", "kv|dim"): "kvlast-hnd",
        ("block", "token", "head", "kv|dim"): "kvlast-nhd",
        ("head", "block", "token", "kv|dim"): "kvlast-hbnd",
    },
    Family.CPU: {("block", "head", "token", "kv|dim"): "packed"},
    Family.MLA: {("block", "token", "dim"): "mla", ("block", "head", "token", "dim"): "mla"},
}


@dataclass(frozen=True, kw_only=True)
class CacheSource:
    """What the connector knows about vLLM's caches besides the tensors (from vLLM's config)."""

    backend: str  # vLLM's attention backend name: FLASHINFER, FLASH_ATTN, TRITON_ATTN, CPU_ATTN, ...
    block_size: int  # vLLM's (manager) block size, `--block-size`
    head_size: int
    use_mla: bool = False

    def __post_init__(self) -> None:
        if not self.use_mla and self.backend not in DENSE_BACKENDS + CPU_BACKENDS:
            raise ConfigError(f"KvxferConnector: attention backend {self.backend} is not supported "
                              f"(supported: {', '.join(DENSE_BACKENDS + CPU_BACKENDS)}, and MLA backends)")

    @property
    def family(self) -> Family:
        if self.use_mla:
            return Family.MLA
        return Family.CPU if self.backend in CPU_BACKENDS else Family.DENSE


@dataclass(frozen=True)
class BlockMap:
    """vLLM's (manager) blocks in kernel blocks: manager block b is kernel blocks b*r .. b*r+r-1,
    `r = blocks_per_block`, each `kernel_block_size` tokens (what the cache views index)."""

    blocks_per_block: int
    kernel_block_size: int

    def kernel_ids(self, manager_ids: np.ndarray | list[int], num_tokens: int | None = None) -> np.ndarray:
        """Kernel block ids of `manager_ids`, in token order; with `num_tokens`, only the blocks
        those tokens occupy (a request's last manager block may be partly empty)."""
        ids = np.asarray(manager_ids, dtype=np.int64)
        r = self.blocks_per_block
        kernel = (ids[:, None] * r + np.arange(r, dtype=np.int64)).reshape(-1)
        if num_tokens is None:
            return kernel
        needed = -(-num_tokens // self.kernel_block_size)
        if needed > kernel.size:
            raise LayoutError(f"{num_tokens} tokens need {needed} kernel blocks of {self.kernel_block_size}, "
                              f"{ids.size} manager blocks hold {kernel.size}")
        return kernel[:needed]

    def manager_ids(self, kernel_ids: np.ndarray | list[int]) -> np.ndarray:
        """The manager blocks holding `kernel_ids` (each once, sorted): what vLLM is told failed."""
        return np.unique(np.asarray(kernel_ids, dtype=np.int64) // self.blocks_per_block)


def common_block_map(per_rank: Mapping[int, BlockMap | None]) -> BlockMap:
    """The one BlockMap of an instance, from what each of its TP ranks read off its own tensors
    (vLLM hands them to the scheduler at start-up; None: a rank said nothing): every rank splits
    blocks alike, or block ids could not be translated once for all of them."""
    maps = set(per_rank.values())
    if len(maps) != 1 or None in maps:
        raise ConfigError(f"KvxferConnector: the workers' kernel blocks differ or are missing: "
                          f"{ {rank: per_rank[rank] for rank in sorted(per_rank)} }")
    return next(m for m in maps if m is not None)


@dataclass(frozen=True)
class VllmCaches:
    """One rank's vLLM caches, as kvxfer sees them."""

    desc: CacheDesc  # every layer alike; strides as vLLM laid the memory out
    backend: str
    layers: list[torch.Tensor]  # per layer, vLLM's memory permuted into desc.layout's axis order
    windows: list[torch.Tensor]  # per layer: uint8 [desc.layer_bytes] from its first row (addresses, staging)
    storages: list[torch.Tensor]  # uint8, one per backing allocation: what NIXL registers, once each
    blocks: BlockMap

    @property
    def layer_addrs(self) -> np.ndarray:
        return np.array([w.data_ptr() for w in self.windows], dtype=np.uint64)


def describe_vllm_caches(kv_caches: dict[str, torch.Tensor], source: CacheSource, *, tp_size: int,
                         tp_rank: int, total_kv_heads: int) -> VllmCaches:
    """vLLM's `kv_caches` (layer name -> tensor, in layer order) described for kvxfer."""
    tensors = _distinct_layers(kv_caches)
    first = tensors[0]
    heads = heads_of_rank(1 if source.use_mla else total_kv_heads, tp_size, tp_rank)
    try:
        roles = _form_of(first, source, num_heads=heads.size)
        order, layout = _physical_order(first, roles, source.family)
        layers = [_check_alike(t, first).permute(order) for t in tensors]
        if source.family is Family.MLA and len(roles) == 4:
            layers = [t.squeeze(1) for t in layers]  # [B, 1, N, C] -> [B, N, C]
        t = layers[0]
        desc = describe_tensor(layout, tuple(t.shape), tuple(s * t.element_size() for s in t.stride()),
                               num_layers=len(layers), dtype=str(t.dtype).removeprefix("torch."),
                               first_head=heads.start, total_heads=1 if source.use_mla else total_kv_heads)
    except LayoutError as err:
        raise LayoutError(f"vLLM {source.backend} cache {tuple(first.shape)} strides {tuple(first.stride())} "
                          f"{first.dtype}: {err}") from None
    windows = [_window(t, desc.layer_bytes) for t in layers]
    caches = VllmCaches(desc, source.backend, layers, windows, _storages(layers),
                        _block_map(source, desc.block_size))
    log.info("kvxfer: vLLM %s caches %s strides %s -> %s, %d layers in %d allocation(s), %d manager block(s) "
             "of %d kernel blocks", source.backend, tuple(first.shape), tuple(first.stride()), desc.layout,
             desc.num_layers, len(caches.storages), desc.num_blocks // caches.blocks.blocks_per_block,
             caches.blocks.blocks_per_block)
    return caches


def _distinct_layers(kv_caches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Layers in order, each distinct view once: layers that share their KV with an earlier one
    (vLLM's KV sharing) hand over the same view, and moving it twice would only waste bytes."""
    if not kv_caches:
        raise LayoutError("register_kv_caches: vLLM handed no cache tensors")
    seen: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    for t in kv_caches.values():
        seen.setdefault((t.data_ptr(), tuple(t.stride())), t)
    return list(seen.values())


def _check_alike(t: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype:
        raise LayoutError(f"a layer's cache {tuple(t.shape)} strides {tuple(t.stride())} {t.dtype} differs "
                          f"from the first layer's; one shape for every layer is supported (no hybrid models)")
    return t


def _form_of(t: torch.Tensor, source: CacheSource, *, num_heads: int) -> tuple[str, ...]:
    """The logical axes of `t`: the first form of its family whose extents fit what this rank holds."""
    forms = _FORMS.get((source.family, t.dim()), ())
    want = {"kv": 2, "head": 1 if source.family is Family.MLA else num_heads,
            "dim": None if source.family is Family.MLA else source.head_size, "kv|dim": 2 * source.head_size}
    for roles in forms:
        if all(want.get(r) in (None, n) for r, n in zip(roles, t.shape, strict=True)):
            return roles
    expected = " or ".join(str(list(f)) for f in forms) or "no form of this many dims"
    raise LayoutError(f"fits none of {expected} with {want['head']} KV head(s) of size {source.head_size} "
                      f"on this rank")


def _physical_order(t: torch.Tensor, roles: tuple[str, ...], family: Family) -> tuple[list[int], str]:
    """The permutation of `t`'s axes into memory order, and the kvxfer layout of that order.

    Axes of extent 1 may carry any stride; they are placed where a known layout wants them."""
    moving = [r for r, n in zip(roles, t.shape, strict=True) if n > 1]
    by_stride = sorted(moving, key=lambda r: -t.stride(roles.index(r)))
    for order, layout in _LAYOUT_OF_ORDER[family].items():
        if len(order) == len(roles) and [r for r in order if r in moving] == by_stride:
            return [roles.index(r) for r in order], layout
    raise LayoutError(f"memory order {by_stride} (by stride) is no kvxfer layout's; known orders: "
                      f"{[list(o) for o in _LAYOUT_OF_ORDER[family]]}")


def _window(t: torch.Tensor, num_bytes: int) -> torch.Tensor:
    """uint8 [num_bytes] over `t`'s storage from `t`'s first element."""
    offset = t.storage_offset() * t.element_size()
    storage = t.untyped_storage()
    if offset + num_bytes > storage.nbytes():
        raise LayoutError(f"a layer's rows reach byte {offset + num_bytes} of a {storage.nbytes()}-byte allocation")
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, offset, (num_bytes,), (1,))


def _storages(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each backing allocation once, whole, as uint8 (vLLM 0.32+: one for every layer)."""
    found: dict[int, torch.Tensor] = {}
    for t in layers:
        storage = t.untyped_storage()
        if storage.data_ptr() not in found:
            found[storage.data_ptr()] = torch.empty(0, dtype=torch.uint8, device=t.device).set_(
                storage, 0, (storage.nbytes(),), (1,))
    return list(found.values())


def _block_map(source: CacheSource, kernel_block_size: int) -> BlockMap:
    if source.block_size % kernel_block_size:
        raise LayoutError(f"vLLM block_size={source.block_size} is not a multiple of the cache's kernel "
                          f"block size {kernel_block_size}")
    return BlockMap(source.block_size // kernel_block_size, kernel_block_size)


def required_layout(*, use_mla: bool) -> str | None:
    """What `get_required_kvcache_layout` answers: MLA has no heads to slice, so no preference."""
    return None if use_mla else REQUIRED_LAYOUT
