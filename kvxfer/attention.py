"""Paged attention over a KV cache in any kvxfer layout: FlashInfer on CUDA, torch elsewhere.

One API for prefill (causal, several tokens per request) and decode (one token per request),
batched, with GQA. A step's `PageTable` says where each request's KV lives; `PagedAttention`
writes the step's new K/V into the cache (`write`), then attends over everything the cache
holds for each request (`run`). The torch path is the reference: it gathers each request's
pages through views of the layout's own tensor shape (never through byte strides).

Where FlashInfer has no kernel (CPU, float32, TRT-LLM separate K/V page ids, MLA, an
unsupported head_dim) the torch path runs instead, and a CUDA fallback is logged once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvxfer.errors import ConfigError, LayoutError
from kvxfer.kernels import FLASHINFER, KERNELS
from kvxfer.layouts import Geometry, get_layout

log = logging.getLogger(__name__)

# FlashInfer's kv_layout for each kvxfer layout it can read, and whether the cache is passed as a
# (K, V) tuple of views instead of one [num_pages, 2, ...] tensor.
_FLASHINFER_LAYOUTS: dict[str, tuple[str, bool]] = {
    "flashinfer-hnd": ("HND", False),
    "flashinfer-nhd": ("NHD", False),
    "flash-attn-hnd": ("HND", True),
    "flash-attn-nhd": ("NHD", True),
    "packed": ("HND", True),
}
_FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
_FLASHINFER_HEAD_DIMS = (64, 128, 256)
_WORKSPACE_BYTES = 128 * 1024 * 1024
_logged_fallbacks: set[str] = set()


@dataclass(frozen=True)
class PageTable:
    """Where each request of one step reads and writes its KV.

    Request b holds `kv_lens[b]` tokens once this step's `q_lens[b]` new tokens are written; the
    new tokens sit at positions `kv_lens[b] - q_lens[b]` .. `kv_lens[b] - 1`.
    """

    block_tables: torch.Tensor  # [batch, max_pages] int32, or [batch, 2, max_pages] (K, V pages apart)
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    block_size: int

    @classmethod
    def build(
        cls,
        block_ids: Sequence[Any],
        num_cached: Sequence[int],
        q_lens: Sequence[int],
        *,
        block_size: int,
        separate_kv_pages: bool = False,
        device: torch.device | str = "cpu",
    ) -> PageTable:
        """One row per request: `block_ids[b]` is `[n]` (or `[2, n]` with separate K/V pages)."""
        kv_lens = tuple(int(c) + int(n) for c, n in zip(num_cached, q_lens, strict=True))
        rows = [torch.as_tensor(ids, dtype=torch.int32).reshape(2 if separate_kv_pages else 1, -1)
                for ids in block_ids]
        for b, (row, kv_len) in enumerate(zip(rows, kv_lens, strict=True)):
            need = -(-kv_len // block_size)
            if row.shape[1] < need:
                raise LayoutError(f"request {b}: {kv_len} tokens at block_size={block_size} need "
                                  f"{need} blocks, got {row.shape[1]}")
        max_pages = max((r.shape[1] for r in rows), default=0)
        table = torch.zeros(len(rows), rows[0].shape[0] if rows else 1, max_pages, dtype=torch.int32)
        for b, row in enumerate(rows):
            table[b, :, : row.shape[1]] = row
        table = table if separate_kv_pages else table[:, 0]
        return cls(table.to(device), tuple(int(n) for n in q_lens), kv_lens, block_size)

    @property
    def separate_kv_pages(self) -> bool:
        return self.block_tables.dim() == 3

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens)

    def token_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(request index, position) of every new token, each `[num_tokens]` int64."""
        device = self.block_tables.device
        q_lens = torch.tensor(self.q_lens, dtype=torch.long, device=device)
        request = torch.repeat_interleave(torch.arange(len(self.q_lens), device=device), q_lens)
        starts = torch.tensor(self.kv_lens, device=device) - q_lens
        first = torch.cumsum(q_lens, 0) - q_lens
        position = starts[request] + torch.arange(request.numel(), device=device) - first[request]
        return request, position

    def pages_of(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K pages and V pages of request b covering its `kv_lens[b]` tokens, each `[n]` long."""
        n = -(-self.kv_lens[b] // self.block_size)
        rows = self.block_tables[b].reshape(-1, self.block_tables.shape[-1])[:, :n].long()
        return rows[0], rows[-1]


def kv_planes(layout: str, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views `(k, v)` of one layer's cache, each `[num_pages, H, block_size, D]`.

    MLA has one latent per token: k and v are the same view (attention reads the latent as both).
    TRT-LLM pools return the pool twice; K and V then differ only by their page ids.
    """
    spec = get_layout(layout)
    geometry = spec.parse_shape(tuple(cache.shape))
    n, bs, h, d = geometry.num_blocks, geometry.block_size, geometry.num_heads, geometry.head_dim
    if layout == "flashinfer-hnd":  # [N, 2, H, bs, D]
        return cache[:, 0], cache[:, 1]
    if layout == "flashinfer-nhd":  # [N, 2, bs, H, D]
        return cache[:, 0].transpose(1, 2), cache[:, 1].transpose(1, 2)
    if layout == "flash-attn-hnd":  # [2, N, H, bs, D]
        return cache[0], cache[1]
    if layout == "flash-attn-nhd":  # [2, N, bs, H, D]
        return cache[0].transpose(1, 2), cache[1].transpose(1, 2)
    if layout == "packed":  # [N, H, bs, 2D]: per (block, head) bs K rows, then bs V rows
        pair = cache.view(n, h, 2, bs, d)
        return pair[:, :, 0], pair[:, :, 1]
    if layout == "trtllm-hnd":  # [P, H, bs, D]
        return cache, cache
    if layout == "trtllm-nhd":  # [P, bs, H, D]
        return cache.transpose(1, 2), cache.transpose(1, 2)
    if layout == "mla":  # [N, bs, D]
        latent = cache.unsqueeze(1)
        return latent, latent
    raise LayoutError(f"attention has no view for layout={layout!r}")


def write_kv(layout: str, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
             table: PageTable) -> None:
    """Scatter the step's new K/V (`[num_tokens, H, D]` each) into their pages and offsets."""
    k_plane, v_plane = kv_planes(layout, cache)
    request, position = table.token_slots()
    slot, offset = position // table.block_size, position % table.block_size
    if table.separate_kv_pages:
        k_pages = table.block_tables[request, 0, slot].long()
        v_pages = table.block_tables[request, 1, slot].long()
    else:
        k_pages = v_pages = table.block_tables[request, slot].long()
    k_plane[k_pages, :, offset] = k.to(cache.dtype)
    if v is not None and get_layout(layout).has_v:
        v_plane[v_pages, :, offset] = v.to(cache.dtype)


def torch_attention(q: torch.Tensor, layout: str, cache: torch.Tensor, table: PageTable,
                    *, scale: float) -> torch.Tensor:
    """Reference paged attention. q: [num_tokens, Hq, D] -> out: [num_tokens, Hq, D].

    Computes in float32 (float64 stays float64); query i of a request with n new tokens and L
    cached tokens sits at position L - n + i and sees keys 0 .. L - n + i.
    """
    k_plane, v_plane = kv_planes(layout, cache)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, start = torch.empty_like(q), 0
    for b, (q_len, kv_len) in enumerate(zip(table.q_lens, table.kv_lens, strict=True)):
        k_pages, v_pages = table.pages_of(b)
        k = _gather(k_plane, k_pages, kv_len).to(compute)  # [Hkv, L, D]
        v = _gather(v_plane, v_pages, kv_len).to(compute)
        qb = q[start : start + q_len].transpose(0, 1).to(compute)  # [Hq, n, D]
        group = qb.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        scores = qb @ k.transpose(1, 2) * scale  # [Hq, n, L]
        query_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(kv_len, device=q.device) > query_pos, -math.inf)
        out[start : start + q_len] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
        start += q_len
    return out


def _gather(plane: torch.Tensor, pages: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """plane: [num_pages, H, bs, D], pages: [n] -> [H, num_tokens, D]."""
    rows = plane[pages]  # [n, H, bs, D]
    n, h, bs, d = rows.shape
    return rows.permute(1, 0, 2, 3).reshape(h, n * bs, d)[:, :num_tokens]


def flashinfer_gap(layout: str, dtype: torch.dtype, head_dim: int, device: torch.device) -> str | None:
    """Why FlashInfer cannot serve this cache here, or None when it can."""
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if layout not in _FLASHINFER_LAYOUTS:
        return f"FlashInfer's paged kernels have no kernel for layout={layout}"
    if dtype not in _FLASHINFER_DTYPES:
        return f"FlashInfer has no {dtype} kernel (float16 and bfloat16 only)"
    if head_dim not in _FLASHINFER_HEAD_DIMS:
        return f"head_dim={head_dim} is not one of FlashInfer's {_FLASHINFER_HEAD_DIMS}"
    try:
        import flashinfer  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError as err:
        return f"flashinfer is not importable ({err})"
    return None


class PagedAttention:
    """Attention for one rank's heads over one cache layout; plan once per step, run per layer."""

    def __init__(self, *, layout: str, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, device: torch.device | str,
                 backend: str = "auto") -> None:
        if num_q_heads % num_kv_heads:
            raise LayoutError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.layout, self.block_size, self.head_dim = layout, block_size, head_dim
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        self.dtype, self.device = dtype, torch.device(device)
        self.scale = head_dim**-0.5
        self._table: PageTable | None = None
        self._flashinfer = self._pick_backend(backend)

    def _pick_backend(self, backend: str) -> _FlashInfer | None:
        if backend not in ("auto", "torch", "flashinfer"):
            raise ConfigError(f"attention backend={backend!r} is not one of auto, torch, flashinfer")
        if backend == "torch":
            return None
        gap = flashinfer_gap(self.layout, self.dtype, self.head_dim, self.device)
        if gap is None:
            return _FlashInfer(self)
        if backend == "flashinfer":
            raise ConfigError(f"attention backend=flashinfer: {gap}")
        if self.device.type == "cuda" and gap not in _logged_fallbacks:
            _logged_fallbacks.add(gap)
            log.warning("attention: torch fallback on %s for layout=%s: %s", self.device, self.layout, gap)
        return None

    @property
    def backend(self) -> str:
        return "torch" if self._flashinfer is None else "flashinfer"

    def plan(self, table: PageTable) -> None:
        """Prepare one step (every layer of it shares the plan)."""
        self._table = table
        if self._flashinfer is not None:
            self._flashinfer.plan(table)

    def write(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Store the step's new k, v: [num_tokens, Hkv, D] each."""
        write_kv(self.layout, cache, k, v, self._planned())

    def run(self, q: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """q: [num_tokens, Hq, D] -> [num_tokens, Hq, D] over the cache's KV (new tokens included)."""
        if self._flashinfer is not None:
            return self._flashinfer.run(q, cache)
        return torch_attention(q, self.layout, cache, self._planned(), scale=self.scale)

    def _planned(self) -> PageTable:
        if self._table is None:
            raise LayoutError("attention: run or write before plan(table)")
        return self._table


class _FlashInfer:
    """FlashInfer's batch decode and batch prefill wrappers for one PagedAttention."""

    def __init__(self, owner: PagedAttention) -> None:
        import flashinfer  # type: ignore[import-not-found,unused-ignore]

        self.owner = owner
        self.kv_layout, self.as_tuple = _FLASHINFER_LAYOUTS[owner.layout]
        device = owner.device
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device), self.kv_layout)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device), self.kv_layout)
        self.is_decode = True

    def plan(self, table: PageTable) -> None:
        o = self.owner
        indptr, indices, last_page_len = _csr_pages(table, o.device)
        self.is_decode = table.is_decode
        common = dict(q_data_type=o.dtype, kv_data_type=o.dtype, sm_scale=o.scale)
        if self.is_decode:
            self.decode.plan(indptr, indices, last_page_len, o.num_q_heads, o.num_kv_heads,
                             o.head_dim, o.block_size, **common)
            return
        qo_indptr = torch.tensor([0, *_cumsum(table.q_lens)], dtype=torch.int32, device=o.device)
        self.prefill.plan(qo_indptr, indptr, indices, last_page_len, o.num_q_heads,
                          o.num_kv_heads, o.head_dim, o.block_size, causal=True, **common)

    def run(self, q: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        kv: Any = kv_planes_for_flashinfer(self.owner.layout, cache) if self.as_tuple else cache
        wrapper = self.decode if self.is_decode else self.prefill
        out: torch.Tensor = wrapper.run(q.contiguous(), kv)  # [num_tokens, Hq, D]
        return out


def kv_planes_for_flashinfer(layout: str, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) views in FlashInfer's own page layout (HND: [P, H, bs, D], NHD: [P, bs, H, D])."""
    k, v = kv_planes(layout, cache)  # [P, H, bs, D]
    if _FLASHINFER_LAYOUTS[layout][0] == "NHD":
        return k.transpose(1, 2), v.transpose(1, 2)
    return k, v


def _cumsum(values: Sequence[int]) -> list[int]:
    out, total = [], 0
    for value in values:
        total += value
        out.append(total)
    return out


def _csr_pages(table: PageTable, device: torch.device) -> tuple[torch.Tensor, ...]:
    """FlashInfer's page table: indptr [batch+1], indices [total_pages], last_page_len [batch]."""
    bs = table.block_size
    counts = [-(-n // bs) for n in table.kv_lens]
    pages = [table.pages_of(b)[0] for b in range(len(counts))]
    indices = torch.cat(pages).to(device=device, dtype=torch.int32)
    indptr = torch.tensor([0, *_cumsum(counts)], dtype=torch.int32, device=device)
    last = torch.tensor([n - (c - 1) * bs for n, c in zip(table.kv_lens, counts, strict=True)],
                        dtype=torch.int32, device=device)
    return indptr, indices, last


# ---- warmup: build every kernel before a daemon reports ready --------------------------------


@dataclass(frozen=True)
class WarmupShape:
    """One rank's attention problem: everything FlashInfer specialises a kernel on."""

    layout: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype


@dataclass(frozen=True)
class WarmupRecord:
    kernel: str  # "decode" or "prefill" plus the shape
    backend: str
    seconds: float
    compiled: tuple[str, ...]  # JIT libraries built by this call (empty: nothing compiled)


def jit_libraries() -> set[str]:
    """Names of FlashInfer's JIT-built libraries on disk (empty without FlashInfer)."""
    try:
        from flashinfer.jit import env as jit_env  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return set()
    root = Path(jit_env.FLASHINFER_JIT_DIR)
    return {p.stem for p in root.glob("**/*.so")} if root.exists() else set()


def warmup(shapes: Sequence[WarmupShape], *, device: torch.device | str) -> list[WarmupRecord]:
    """Run one decode and one prefill per shape so every kernel is built (and loaded) now.

    Each kernel is logged with its name, elapsed seconds and the JIT libraries it compiled.
    """
    records = []
    for shape in dict.fromkeys(shapes):
        attn = PagedAttention(layout=shape.layout, num_q_heads=shape.num_q_heads,
                              num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                              block_size=shape.block_size, dtype=shape.dtype, device=device)
        for kind, q_len in (("decode", 1), ("prefill", 3)):
            records.append(_warm_one(attn, shape, kind, q_len))
    return records


def _warm_one(attn: PagedAttention, shape: WarmupShape, kind: str, q_len: int) -> WarmupRecord:
    spec = get_layout(shape.layout)
    num_pages = 4
    geometry_shape = spec.shape(Geometry(num_pages, shape.block_size, shape.num_kv_heads, shape.head_dim))
    cache = torch.zeros(geometry_shape, dtype=shape.dtype, device=attn.device)
    pages = torch.arange(num_pages).reshape(2, -1) if spec.separate_kv_pages else torch.arange(2)
    table = PageTable.build([pages], [shape.block_size], [q_len], block_size=shape.block_size,
                            separate_kv_pages=spec.separate_kv_pages, device=attn.device)
    q = torch.zeros(q_len, shape.num_q_heads, shape.head_dim, dtype=shape.dtype, device=attn.device)
    before, start = jit_libraries(), time.perf_counter()
    attn.plan(table)
    attn.run(q, cache)
    if attn.device.type == "cuda":
        torch.cuda.synchronize(attn.device)
    seconds = time.perf_counter() - start
    compiled = tuple(sorted(jit_libraries() - before))
    name = (f"{kind} {shape.layout} q_heads={shape.num_q_heads} kv_heads={shape.num_kv_heads} "
            f"head_dim={shape.head_dim} page={shape.block_size} {str(shape.dtype).removeprefix('torch.')}")
    if attn.backend == "flashinfer":
        KERNELS.record(FLASHINFER, f"{name}{' (' + ', '.join(compiled) + ')' if compiled else ''}", seconds,
                       compiled=bool(compiled))
    else:
        log.info("warmup: %s kernel %s ready in %.2f s (nothing to compile)", attn.backend, name, seconds)
    return WarmupRecord(name, attn.backend, seconds, compiled)

