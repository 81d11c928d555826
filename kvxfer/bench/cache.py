"""One rank's cache for the bench: per-layer tensors, the request's block ids, the request's
deterministic contents, and verification by torch indexing (kvxfer.verify), independent of the
byte strides the planner used."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch

from kvxfer.agents.messages import Role
from kvxfer.bench.config import BenchConfig
from kvxfer.layouts import CacheDesc, CacheRegion, describe, num_blocks_for
from kvxfer.planning import HeadRange, heads_of_rank
from kvxfer.verify import read_request, write_request

TORCH_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2, "uint8": torch.uint8,
}
SCRAMBLE_BYTE = 0x5A


@dataclass
class RankCache:
    role: Role
    rank: int
    heads: HeadRange
    desc: CacheDesc
    tensors: list[torch.Tensor]  # per layer: desc.shape
    block_ids: np.ndarray  # [n] or [2, n] for separate K/V pages

    @property
    def region(self) -> CacheRegion:
        addrs = np.array([t.data_ptr() for t in self.tensors], dtype=np.uint64)
        return CacheRegion(self.desc, addrs, device_id=_device_id(self.tensors[0]))


def _device_id(t: torch.Tensor) -> int:
    return 0 if t.device.type == "cpu" else int(t.device.index or 0)


def make_cache(cfg: BenchConfig, role: Role, rank: int) -> RankCache:
    """Allocate one rank's cache (every layer) and pick the request's blocks in its pool."""
    is_prefill = role is Role.PREFILL
    tp = cfg.prefill_tp if is_prefill else cfg.decode_tp
    layout = cfg.prefill_layout if is_prefill else cfg.decode_layout
    block_size = cfg.prefill_block_size if is_prefill else cfg.decode_block_size
    heads = heads_of_rank(cfg.kv_heads, tp, rank, field=f"{role.value}_tp")
    needed = num_blocks_for(cfg.tokens, block_size)
    probe = describe(layout, num_layers=1, num_blocks=1, block_size=block_size, num_heads=heads.size,
                     head_dim=cfg.head_dim, dtype=cfg.dtype, first_head=heads.start,
                     total_heads=cfg.kv_heads)
    pages = 2 * needed if probe.separate_kv_pages else needed
    pool = pages + int(pages * cfg.spare_blocks)
    desc = describe(layout, num_layers=cfg.layers, num_blocks=pool, block_size=block_size,
                    num_heads=heads.size, head_dim=cfg.head_dim, dtype=cfg.dtype,
                    first_head=heads.start, total_heads=cfg.kv_heads)
    tensors = _allocate(cfg, desc, rank)
    rng = np.random.default_rng([cfg.seed, 0 if is_prefill else 1, rank])
    ids = rng.permutation(pool)[:pages] if cfg.random_blocks else np.arange(pages)
    if desc.separate_kv_pages:
        ids = ids.reshape(2, needed)
    return RankCache(role, rank, heads, desc, tensors, ids.astype(np.int64))


def host_buffer(num_bytes: int, *, huge_pages: bool) -> torch.Tensor:
    """`[num_bytes]` uint8 host memory from its own anonymous mapping, optionally with
    transparent huge pages (fewer pages for the kernel to pin per process_vm_readv/writev)."""
    mapping = mmap.mmap(-1, max(num_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=num_bytes)  # keeps `mapping` alive


def _allocate(cfg: BenchConfig, desc: CacheDesc, rank: int) -> list[torch.Tensor]:
    """Per-layer tensors of `desc.shape`: CUDA memory on GPU `rank`, else one host mapping."""
    dtype = TORCH_DTYPES[cfg.dtype]
    if cfg.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        return [torch.empty(desc.shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
    arena = host_buffer(desc.layer_bytes * cfg.layers, huge_pages=cfg.huge_pages)
    # arena: [layers * layer_bytes] bytes -> per layer desc.shape
    return [arena[i * desc.layer_bytes:(i + 1) * desc.layer_bytes].view(dtype).view(desc.shape)
            for i in range(cfg.layers)]


def request_kv(cfg: BenchConfig, layer: int, heads: HeadRange, device: torch.device) -> torch.Tensor:
    """`[kv, heads, tokens, D]` of one layer of the request: random bits, the same in every
    process (seeded by layer), so a decode rank can check what prefill wrote without seeing it."""
    num_kv = 1 if "mla" in (cfg.prefill_layout, cfg.decode_layout) else 2
    dtype = TORCH_DTYPES[cfg.dtype]
    item = torch.empty((), dtype=dtype).element_size()
    num_bytes = num_kv * cfg.kv_heads * cfg.tokens * cfg.head_dim * item
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + layer)
    words = torch.randint(-(2**62), 2**62, (-(-num_bytes // 8),), dtype=torch.int64, generator=gen)
    full = words.view(torch.uint8)[:num_bytes].view(dtype)
    full = full.view(num_kv, cfg.kv_heads, cfg.tokens, cfg.head_dim)
    return full[:, heads.start:heads.stop].to(device)


def fill_prefill(cfg: BenchConfig, cache: RankCache) -> None:
    """Garbage everywhere, then the request's tokens into the request's blocks."""
    for layer, t in enumerate(cache.tensors):
        t.view(torch.uint8).fill_(layer % 251)
        write_request(cache.desc.layout, t, cache.block_ids,
                      request_kv(cfg, layer, cache.heads, t.device))


def scramble(cache: RankCache) -> None:
    """Overwrite the whole cache, and wait for it: transfers and the staged scatter run on
    streams of their own, which nothing orders after this fill."""
    for t in cache.tensors:
        t.view(torch.uint8).fill_(SCRAMBLE_BYTE)
    if cache.tensors and cache.tensors[0].is_cuda:
        torch.cuda.synchronize(cache.tensors[0].device)


def verify(cfg: BenchConfig, cache: RankCache) -> tuple[bool, str, int]:
    """Compare every byte of the request in this cache with what prefill wrote."""
    checked = 0
    for layer, t in enumerate(cache.tensors):
        got = read_request(cache.desc.layout, t, cache.block_ids, cfg.tokens).contiguous()
        want = request_kv(cfg, layer, cache.heads, t.device).contiguous()
        same = got.view(torch.uint8) == want.view(torch.uint8)
        if not bool(same.all()):
            first = int((~same).flatten().nonzero()[0])
            return False, (f"{cache.role.value} rank {cache.rank} layer {layer}: "
                           f"{int((~same).sum())} bytes differ, first at byte {first}"), checked
        checked += got.numel() * got.element_size()
    return True, "", checked


def snapshot(cache: RankCache) -> list[torch.Tensor]:
    return [t.detach().to("cpu", copy=True) for t in cache.tensors]


def dump(directory: str, cache: RankCache, before: list[torch.Tensor] | None) -> str:
    """`{directory}/{role}{rank}.safetensors`: each layer before and after, and the block ids."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"block_ids": torch.from_numpy(cache.block_ids.copy())}
    for layer, t in enumerate(cache.tensors):
        tensors[f"layer{layer}.after"] = t.detach().to("cpu").contiguous()
        if before is not None:
            tensors[f"layer{layer}.before"] = before[layer].contiguous()
    path = os.path.join(directory, f"{cache.role.value}{cache.rank}.safetensors")
    meta = {"layout": cache.desc.layout, "heads": f"{cache.heads.start},{cache.heads.stop}"}
    save_file(tensors, path, metadata=meta)
    return path
