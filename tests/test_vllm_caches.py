"""kvxfer.integrations.vllm.caches without vLLM: vLLM 0.25-style tensors built with torch as its
GPU runner builds them (`torch.zeros(bytes, int8).view(dtype).view(shape in stride order)
.permute(inverse)`), described, and every (block, K/V, head, token) row the description addresses
holds exactly what the backend reads there; what fits no layout is refused, naming backend, shape
and strides; manager -> kernel block ids by table. vLLM 0.32's own views, and real transfers
between processes, are in tests/vllm/test_caches_xproc.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvxfer.errors import ConfigError, LayoutError
from kvxfer.integrations.vllm.caches import (
    BlockMap,
    CacheSource,
    common_block_map,
    describe_vllm_caches,
    required_layout,
)

B, N, D, TOTAL = 3, 16, 8, 4
HND, NHD = (0, 1, 3, 2, 4), (0, 1, 2, 3, 4)  # 0.25's get_kv_cache_stride_order for (B, 2, N, H, D)


def runner_tensor(shape: tuple[int, ...], order: tuple[int, ...], dtype=torch.float16) -> torch.Tensor:
    """One layer's cache as vLLM 0.25's GPU runner makes it: physical order `order`, logical `shape`."""
    raw = torch.randint(-128, 127, (int(np.prod(shape)) * dtype.itemsize,), dtype=torch.int8)
    inverse = [order.index(i) for i in range(len(order))]
    return raw.view(dtype).view(tuple(shape[i] for i in order)).permute(*inverse)


def layers(shape, order, num_layers=2, **kw):
    return {f"model.layers.{i}.attn": runner_tensor(shape, order, **kw) for i in range(num_layers)}


def backend_reads(kind: str, t: torch.Tensor) -> list[torch.Tensor]:
    """What the backend reads as K and V, each [blocks, block_size, H, D]."""
    if kind == "0.25":  # FlashInfer, FlashAttention, Triton: kv_cache.unbind(1)
        return list(t.unbind(1))
    if kind == "fa-legacy":  # FlashAttention before 0.12: kv_cache.unbind(0)
        return list(t.unbind(0))
    if kind == "cpu":  # CPU_ATTN: view(B, H, 2N, D).chunk(2, dim=2)
        b, h, n, _ = t.shape
        return [x.transpose(1, 2) for x in t.view(b, h, 2 * n, -1).chunk(2, dim=2)]
    return [t.unsqueeze(2)]  # MLA [B, N, C]: the latent


def assert_rows_where_backend_reads(kind: str, kv_caches: dict[str, torch.Tensor], caches) -> None:
    desc = caches.desc
    for window, t in zip(caches.windows, kv_caches.values(), strict=True):
        flat = window.numpy()
        for kv, plane in enumerate(backend_reads(kind, t)):
            b, n, h = np.meshgrid(np.arange(plane.shape[0]), np.arange(plane.shape[1]), np.arange(plane.shape[2]),
                                  indexing="ij")
            at = b * desc.block_stride + kv * desc.kv_stride + h * desc.head_stride + n * desc.token_stride
            rows = flat[at.reshape(-1)[:, None] + np.arange(desc.row_bytes)]
            want = plane.contiguous().view(torch.uint8).numpy().reshape(rows.shape)
            assert np.array_equal(rows, want), f"kv {kv}"


@pytest.mark.parametrize(
    "kind,backend,shape,order,layout",
    [
        ("0.25", "FLASHINFER", (B, 2, N, 2, D), HND, "flashinfer-hnd"),
        ("0.25", "FLASHINFER", (B, 2, N, 2, D), NHD, "flashinfer-nhd"),
        ("0.25", "FLASH_ATTN", (B, 2, N, 2, D), HND, "flashinfer-hnd"),
        ("0.25", "TRITON_ATTN", (B, 2, N, 2, D), NHD, "flashinfer-nhd"),
        ("0.25", "FLASH_ATTN", (B, 2, N, 1, D), NHD, "flashinfer-hnd"),  # one head: HND and NHD are one
        ("fa-legacy", "FLASH_ATTN", (2, B, N, 2, D), HND, "flash-attn-hnd"),
        ("fa-legacy", "FLASH_ATTN", (2, B, N, 2, D), NHD, "flash-attn-nhd"),
        ("cpu", "CPU_ATTN", (B, 2, N, 2 * D), (0, 1, 2, 3), "packed"),
        ("mla", "FLASHMLA", (B, N, 3 * D), (0, 1, 2), "mla"),
    ],
)
def test_rows_are_where_the_backend_reads_them(kind, backend, shape, order, layout):
    kv_caches = layers(shape, order)
    mla = kind == "mla"
    heads = 1 if mla else shape[1 if kind == "cpu" else 3]
    source = CacheSource(backend=backend, block_size=2 * N, head_size=3 * D if mla else D, use_mla=mla)
    caches = describe_vllm_caches(kv_caches, source, tp_size=2 if mla else TOTAL // heads, tp_rank=1,
                                  total_kv_heads=1 if mla else TOTAL)
    desc = caches.desc
    assert (desc.layout, desc.block_size, desc.num_layers) == (layout, N, 2)
    assert desc.heads == ((0, 1) if mla else (heads, 2 * heads))
    assert caches.blocks == BlockMap(blocks_per_block=2, kernel_block_size=N)
    assert len(caches.storages) == 2  # one allocation per layer in 0.25
    assert [w.data_ptr() for w in caches.windows] == [t.data_ptr() for t in kv_caches.values()]
    assert_rows_where_backend_reads(kind, kv_caches, caches)


def test_layers_sharing_one_cache_are_described_once():
    shared = runner_tensor((B, 2, N, 4, D), HND)
    caches = describe_vllm_caches({"a": shared, "b": shared, "c": runner_tensor((B, 2, N, 4, D), HND)},
                                  CacheSource(backend="FLASHINFER", block_size=N, head_size=D),
                                  tp_size=1, tp_rank=0, total_kv_heads=TOTAL)
    assert caches.desc.num_layers == 2


FA = CacheSource(backend="FLASH_ATTN", block_size=N, head_size=D)


@pytest.mark.parametrize(
    "kv_caches,source,match",
    [
        (layers((B, 2, N, 4, D), HND), FA, r"FLASH_ATTN cache \(3, 2, 16, 4, 8\) strides .* 2 KV head"),
        (layers((B, 2, N, 2, 2 * D), HND), FA, "KV head"),
        (layers((B, 2, N, 2 * 3 * D), (0, 1, 2, 3)), FA, r"\(3, 2, 16, 48\)"),  # Dk != Dv
        (layers((B, 2, N, 2, D), HND, dtype=torch.int8), FA, "dtype='int8'"),
        (layers((B, 2, N, 2, D), HND), CacheSource(backend="FLASH_ATTN", block_size=24, head_size=D),
         "block_size=24 is not a multiple"),
        ({"a": runner_tensor((B, 2, N, 2, D), HND), "b": runner_tensor((B, 2, N, 2, D), NHD)}, FA, "differs"),
        # 0.25's cross-layer HND FlashAttention: each layer's K/V inside a head of a block
        ({"a": runner_tensor((3, B, 2, N, 2, D), (1, 4, 0, 2, 3, 5))[0]}, FA, "no kvxfer layout"),
        ({}, FA, "no cache tensors"),
    ],
)
def test_tensors_that_fit_no_layout_are_refused(kv_caches, source, match):
    with pytest.raises(LayoutError, match=match):
        describe_vllm_caches(kv_caches, source, tp_size=2, tp_rank=0, total_kv_heads=TOTAL)


def test_unsupported_backends_are_refused_at_start_up():
    with pytest.raises(ConfigError, match="attention backend FLEX_ATTENTION is not supported"):
        CacheSource(backend="FLEX_ATTENTION", block_size=16, head_size=64)
    CacheSource(backend="CUTLASS_MLA", block_size=64, head_size=576, use_mla=True)


@pytest.mark.parametrize(
    "r,n,manager,num_tokens,kernel,back",
    [
        (1, 16, [5, 2], None, [5, 2], [2, 5]),
        (2, 16, [5, 2], None, [10, 11, 4, 5], [2, 5]),
        (4, 16, [1, 0], 70, [4, 5, 6, 7, 0], [0, 1]),
        (4, 16, [3], 64, [12, 13, 14, 15], [3]),
        (2, 32, [7], 1, [14], [7]),
    ],
)
def test_manager_blocks_map_to_kernel_blocks(r, n, manager, num_tokens, kernel, back):
    blocks = BlockMap(r, n)
    assert blocks.kernel_ids(manager, num_tokens).tolist() == kernel
    assert blocks.manager_ids(kernel).tolist() == back


def test_more_tokens_than_the_blocks_hold_is_refused():
    with pytest.raises(LayoutError, match="65 tokens need 5 kernel blocks of 16, 1 manager blocks hold 4"):
        BlockMap(4, 16).kernel_ids([3], 65)


def test_every_rank_must_split_blocks_alike():
    assert common_block_map({0: BlockMap(4, 16), 1: BlockMap(4, 16)}) == BlockMap(4, 16)
    with pytest.raises(ConfigError, match=r"kernel blocks differ or are missing: \{0: BlockMap\(blocks_per_block=4"):
        common_block_map({0: BlockMap(4, 16), 1: BlockMap(2, 32)})
    with pytest.raises(ConfigError, match=r"differ or are missing: \{\}"):
        common_block_map({})
    with pytest.raises(ConfigError, match=r"differ or are missing: \{0: BlockMap.*, 1: None\}"):
        common_block_map({0: BlockMap(4, 16), 1: None})


def test_the_connector_asks_for_hnd_except_for_mla():
    assert required_layout(use_mla=False) == "HND"
    assert required_layout(use_mla=True) is None
