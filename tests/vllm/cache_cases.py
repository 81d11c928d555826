"""vLLM KV caches built the way each vLLM version builds them, and read the way each backend reads
them; one rank process of the cross-process transfer test (`test_caches_xproc.py`).

vLLM 0.32 caches come from vLLM's own code (`compute_layout_strides` for the placement, then
`allocate_kv_cache`, which calls `create_kv_cache_views`), in the test process; rank processes
rebuild the same views (shape, strides, offset) over a buffer of their own (`Recipe`). vLLM 0.25's per-layer tensors are
built with torch exactly as its GPU runner does (`torch.zeros(bytes, int8).view(dtype)
.view(shape in stride order).permute(inverse order)`), since 0.25's backends are not installed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from kvxfer.agents.messages import MemoryKind
from kvxfer.agents.nixl_agent import AgentConfig, NixlAgent, Op
from kvxfer.errors import PlanError
from kvxfer.integrations.vllm.caches import CacheSource, VllmCaches, describe_vllm_caches
from kvxfer.layouts import CacheRegion
from kvxfer.planning import Fallback, heads_of_rank, map_tp, pair, request_spans

log = logging.getLogger(__name__)
NUM_LAYERS, NUM_BLOCKS, HEAD_SIZE, TOTAL_HEADS, NUM_TOKENS = 2, 8, 16, 4, 40
MLA_SIZE = 24  # the latent's width (576 for DeepSeek)
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Side:
    """One instance's cache: how it is built (`form`), by which backend, its vLLM layout and its
    (manager) and kernel block sizes."""

    form: str  # "0.32", "0.25", "fa-legacy" (FlashAttention before 0.12), "mla-0.32", "mla-0.25"
    backend: str
    layout: str  # a KVCacheLayout name (0.32) or "HND" / "NHD" (0.25)
    block_size: int
    kernel_block_size: int

    @property
    def use_mla(self) -> bool:
        return self.form.startswith("mla")


def v32(layout: str, block_size: int, kernel: int | None = None, backend: str = "FLASH_ATTN") -> Side:
    """A vLLM 0.32 dense cache: `block_size` vLLM's, `kernel` the views' (default the same)."""
    return Side("0.32", backend, layout, block_size, kernel or block_size)


def v25(layout: str, block_size: int, kernel: int | None = None, backend: str = "FLASHINFER",
        form: str = "0.25") -> Side:
    return Side(form, backend, layout, block_size, kernel or block_size)


@dataclass(frozen=True)
class Case:
    name: str
    prefill: Side
    decode: Side


@dataclass(frozen=True)
class Recipe:
    """vLLM 0.32's views as `allocate_kv_cache` made them (per layer: shape, element strides and
    offset into one buffer of `num_bytes`), so rank processes rebuild them exactly without paying
    for importing vLLM."""

    num_bytes: int
    layers: tuple[tuple[str, tuple[int, ...], tuple[int, ...], int], ...]


def vllm_recipe(side: Side, tp_size: int, tp_rank: int) -> Recipe:
    heads = 1 if side.use_mla else heads_of_rank(TOTAL_HEADS, tp_size, tp_rank).size
    views = _build_032(side, heads)
    first = next(iter(views.values()))
    return Recipe(first.untyped_storage().nbytes(), tuple(
        (name, tuple(v.shape), tuple(v.stride()), v.storage_offset()) for name, v in views.items()))


def build(side: Side, tp_size: int, tp_rank: int, recipe: Recipe | None) -> dict[str, torch.Tensor]:
    if recipe is not None:
        buf = torch.zeros(recipe.num_bytes, dtype=torch.int8)
        return {name: torch.empty(0, dtype=DTYPE).set_(buf.untyped_storage(), offset, shape, stride)
                for name, shape, stride, offset in recipe.layers}
    return _build_025(side, 1 if side.use_mla else heads_of_rank(TOTAL_HEADS, tp_size, tp_rank).size)


def _build_032(side: Side, heads: int) -> dict[str, torch.Tensor]:
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
        MLAAttentionSpec,
        compute_layout_strides,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    layout = KVCacheLayout[side.layout]
    if side.use_mla:
        spec = MLAAttentionSpec(block_size=side.block_size, num_kv_heads=1, head_size=MLA_SIZE, dtype=DTYPE)
    else:
        spec = FullAttentionSpec(block_size=side.block_size, num_kv_heads=heads, head_size=HEAD_SIZE, dtype=DTYPE)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NUM_BLOCKS, NUM_LAYERS, layout)
    tensor = KVCacheTensor(size=spec.page_size_bytes * NUM_BLOCKS * NUM_LAYERS, layers=names,
                           layer_stride=layer_stride, block_stride=block_stride)
    config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[tensor],
                           kv_cache_groups=[KVCacheGroupSpec(names, spec)])
    return allocate_kv_cache(config, torch.device("cpu"), layout, kernel_block_sizes=[side.kernel_block_size])


def _build_025(side: Side, heads: int) -> dict[str, torch.Tensor]:
    blocks = NUM_BLOCKS * side.block_size // side.kernel_block_size
    n = side.kernel_block_size
    if side.use_mla:
        shape, order = (blocks, n, MLA_SIZE), (0, 1, 2)
    elif side.form == "fa-legacy":
        shape = (2, blocks, n, heads, HEAD_SIZE)
        order = (0, 1, 2, 3, 4) if side.layout == "NHD" else (0, 1, 3, 2, 4)
    else:  # FlashInfer, FlashAttention and Triton in 0.25: (num_blocks, 2, block_size, H, D)
        shape = (blocks, 2, n, heads, HEAD_SIZE)
        order = (0, 1, 2, 3, 4) if side.layout == "NHD" else (0, 1, 3, 2, 4)
    inverse = [order.index(i) for i in range(len(order))]
    size = int(np.prod(shape)) * DTYPE.itemsize
    return {f"model.layers.{i}.self_attn.attn": torch.zeros(size, dtype=torch.int8).view(DTYPE)
            .view(tuple(shape[i] for i in order)).permute(*inverse) for i in range(NUM_LAYERS)}


def backend_kv(side: Side, cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The K and V tensors the backend itself reads, each `[blocks, block_size, H, D]` (MLA: the
    latent alone, `[blocks, block_size, 1, C]`)."""
    if side.form == "mla-0.32":  # [B, 1, N, C]
        return (cache.transpose(1, 2),)
    if side.form == "mla-0.25":  # [B, N, C]
        return (cache.unsqueeze(2),)
    if side.backend == "CPU_ATTN":  # vLLM's cpu_attn: view(B, H, 2N, D).chunk(2, dim=2)
        b, h, n, _ = cache.shape
        return tuple(x.transpose(1, 2) for x in cache.view(b, h, 2 * n, -1).chunk(2, dim=2))
    if side.form == "0.32":  # FlashAttention / Triton: transpose(1, 2).split(head_size, -1)
        return cache.transpose(1, 2).split(HEAD_SIZE, dim=-1)
    if side.form == "fa-legacy":  # kv_cache.unbind(0)
        return cache.unbind(0)
    return cache.unbind(1)  # 0.25: kv_cache.unbind(1)


def logical_kv(case_index: int, side: Side) -> torch.Tensor:
    """`[layers, kv, total heads, tokens, D]`: what every rank agrees the request's KV is."""
    g = torch.Generator().manual_seed(1000 + case_index)
    if side.use_mla:
        return torch.randn(NUM_LAYERS, 1, 1, NUM_TOKENS, MLA_SIZE, generator=g).to(DTYPE)
    return torch.randn(NUM_LAYERS, 2, TOTAL_HEADS, NUM_TOKENS, HEAD_SIZE, generator=g).to(DTYPE)


def manager_ids(case_index: int, role: str, side: Side) -> list[int]:
    needed = -(-NUM_TOKENS // side.block_size)
    rng = np.random.default_rng(case_index * 2 + (role == "decode"))
    return [int(b) for b in rng.permutation(NUM_BLOCKS)[:needed]]


def source_of(side: Side) -> CacheSource:
    return CacheSource(backend=side.backend, block_size=side.block_size,
                       head_size=MLA_SIZE if side.use_mla else HEAD_SIZE, use_mla=side.use_mla)


@dataclass
class Prepared:
    side: Side
    kv_caches: dict[str, torch.Tensor]
    caches: VllmCaches
    manager_ids: list[int]  # the request's blocks as vLLM allocated them
    kernel_ids: np.ndarray  # ... as the connector translates them (what plans see)
    heads: range


def prepare(case_index: int, case: Case, role: str, tp_size: int, tp_rank: int,
            recipe: Recipe | None) -> Prepared:
    side = case.prefill if role == "prefill" else case.decode
    kv_caches = build(side, tp_size, tp_rank, recipe)
    total = 1 if side.use_mla else TOTAL_HEADS
    caches = describe_vllm_caches(kv_caches, source_of(side), tp_size=tp_size, tp_rank=tp_rank,
                                  total_kv_heads=total)
    ids = manager_ids(case_index, role, side)
    kernel = caches.blocks.kernel_ids(ids, NUM_TOKENS)
    hr = heads_of_rank(total, tp_size, tp_rank)
    prepared = Prepared(side, kv_caches, caches, ids, kernel, range(hr.start, hr.stop))
    for layer, cache in enumerate(kv_caches.values()):
        for plane in backend_kv(side, cache):  # decode: a sentinel everywhere, to see what changed
            plane.copy_(torch.full_like(plane, -7.0 if role == "decode" else 0.0))
        if role == "prefill":
            _write_request(prepared, layer, cache, logical_kv(case_index, side))
    return prepared


def _positions(p: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel block, offset) of every request token, as vLLM's block table expansion places it
    (kernel block j of vLLM block b is b * r + j), from vLLM's ids: not through the connector's
    translation, which is under test."""
    tokens = torch.arange(NUM_TOKENS)
    n, k = p.side.block_size, p.side.kernel_block_size
    manager = torch.as_tensor(p.manager_ids)[tokens // n]
    return manager * (n // k) + tokens % n // k, tokens % k


def _write_request(p: Prepared, layer: int, cache: torch.Tensor, logical: torch.Tensor) -> None:
    blocks, offsets = _positions(p)
    for kv, plane in enumerate(backend_kv(p.side, cache)):
        plane[blocks, offsets] = logical[layer, kv, p.heads.start:p.heads.stop].permute(1, 0, 2)


def check_request(case_index: int, p: Prepared) -> str:
    """'' when every request token of every layer, K and V, holds the producer's bytes for this
    rank's heads and no block outside the request changed; else what differs."""
    logical = logical_kv(case_index, p.side)
    blocks, offsets = _positions(p)
    others = torch.as_tensor(sorted(set(range(p.caches.desc.num_blocks)) - set(blocks.tolist())))
    for layer, cache in enumerate(p.kv_caches.values()):
        for kv, plane in enumerate(backend_kv(p.side, cache)):
            want = logical[layer, kv, p.heads.start:p.heads.stop].permute(1, 0, 2)
            got = plane[blocks, offsets]
            if not torch.equal(got.view(torch.int16), want.contiguous().view(torch.int16)):
                bad = (got != want).nonzero()[0].tolist()
                return f"layer {layer} kv {kv}: token/head/dim {bad} differs"
            if others.numel() and not bool((plane[others] == -7.0).all()):
                return f"layer {layer} kv {kv}: a block outside the request changed"
    return ""


# -- one rank process ------------------------------------------------------------------------------


def rank_main(conn, role: str, tp_size: int, tp_rank: int, cases: list[Case], recipes: list[Recipe | None],
              prefill_tp: int, decode_tp: int) -> None:
    """Build every case's cache, register all of them with one NIXL agent, report; a decode rank
    then reads each case from its producer ranks and checks what its backend would read."""
    _serve(conn, role, tp_size, tp_rank, cases, recipes, prefill_tp, decode_tp)
    # Everything is released and every reply sent; skip interpreter teardown (torch and UCX
    # finalizers take seconds), as kvxfer's bench ranks do.
    conn.close()
    os._exit(0)


def _serve(conn, role: str, tp_size: int, tp_rank: int, cases: list[Case], recipes: list[Recipe | None],
           prefill_tp: int, decode_tp: int) -> None:
    started = time.monotonic()
    prepared = [prepare(i, c, role, tp_size, tp_rank, r) for i, (c, r) in enumerate(zip(cases, recipes, strict=True))]
    with NixlAgent(AgentConfig(name=f"{role}-{tp_rank}-{time.monotonic_ns()}")) as agent:
        agent.register([s for p in prepared for s in p.caches.storages])
        log.info("%s rank %d: %d caches built and registered in %.1f s", role, tp_rank, len(prepared),
                 time.monotonic() - started)
        conn.send((agent.name, agent.metadata(), [_region(p) for p in prepared],
                   [p.kernel_ids for p in prepared]))
        if role == "prefill":
            while not conn.poll(0.002):
                agent.progress()
            return
        producers = conn.recv()  # per prefill rank: (name, metadata, regions, kernel ids)
        for _, metadata, _, _ in producers:
            agent.add_peer(metadata)
        results = [_read_case(agent, i, p, producers, prefill_tp, decode_tp, tp_rank)
                   for i, p in enumerate(prepared)]
        conn.send(results)
        conn.recv()


def _region(p: Prepared) -> CacheRegion:
    return CacheRegion(p.caches.desc, p.caches.layer_addrs, 0)


def _read_case(agent: NixlAgent, index: int, p: Prepared, producers: list, prefill_tp: int, decode_tp: int,
               rank: int) -> dict:
    """READ one case from every producer rank this rank needs; strict pairing first, per-token
    spans only where strict pairing refuses (NHD head slices)."""
    total = 1 if p.side.use_mla else TOTAL_HEADS
    result = {"refused": "", "descriptors": 0, "detail": ""}
    transfers = []
    for a in map_tp(total, prefill_tp, decode_tp).sources_of(rank):
        name, _, regions, kernel_ids = producers[a.prefill_rank]
        try:
            plan = pair(_region(p), regions[index], a.heads)
        except PlanError as err:
            result["refused"] = str(err)
            plan = pair(_region(p), regions[index], a.heads, fallback=Fallback.FINE)
        spans = request_spans(plan, p.kernel_ids, kernel_ids[index], NUM_TOKENS)
        result["descriptors"] += spans.num_descriptors
        transfers.append(agent.post_spans(Op.READ, spans.local, spans.remote, peer=name,
                                          local_mem=MemoryKind.DRAM, remote_mem=MemoryKind.DRAM))
    agent.wait(transfers, timeout_s=30)
    result["detail"] = check_request(index, p)
    return result
