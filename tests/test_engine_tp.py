"""Tensor parallelism across processes (spawn + gloo) and KV moved by hand between TP sizes.

One chain of runs, each checked against TP 1 in this process:
  TP 1 (flash-attn-nhd, block 4) prefill -> KV by torch indexing -> TP 2 decode (flashinfer-hnd, 4)
  TP 2 prefill -> TP 4 decode (packed, block 8; TP 4 > 2 KV heads: each head on two ranks)
  TP 4 prefill -> TP 1 decode (trtllm-hnd, block 2: separate K and V pages)
The KV is read and written with `kvxfer.verify` (torch views), never with the planner: this is
the oracle the daemons' transfer tests use.
"""

from __future__ import annotations

import queue as queue_lib

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from kvxfer.engine import (
    CacheConfig,
    DecodeRequest,
    Engine,
    EngineConfig,
    TPGroup,
    free_port,
    preset,
)
from kvxfer.verify import read_request, write_request

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 200, 3, 99, 42, 7, 64, 128, 1, 250, 33, 71]
NEW_TOKENS = 6
SEED = 3


def engine_config(layout: str, block_size: int, model: str = "tiny") -> EngineConfig:
    return EngineConfig(model=preset(model), seed=SEED,
                        cache=CacheConfig(layout=layout, block_size=block_size, num_blocks=24))


def prefill_dump(engine: Engine) -> dict:
    """Prefill PROMPT; return the first token and each layer's KV of this rank's heads."""
    ids = engine.allocator.allocate(engine.blocks_needed(len(PROMPT)))
    blocks = engine.shape_block_ids(ids)
    first = engine.prefill(PROMPT, blocks).tokens[0]
    layout = engine.config.cache.layout
    # kv: [2, H_local, len(PROMPT), D] per layer
    kv = [read_request(layout, cache, blocks, len(PROMPT)).numpy().copy() for cache in engine.caches]
    engine.allocator.free(ids)
    heads = engine.shard.kv_heads
    return {"first": first, "kv": kv, "heads": (heads.start, heads.stop)}


def decode_from(engine: Engine, source: dict) -> list[int]:
    """Write this rank's heads of a dumped prefill into fresh blocks, then decode from them."""
    engine.allocator.allocate(3)  # so block ids differ from the prefill side's
    ids = engine.allocator.allocate(engine.blocks_needed(len(PROMPT) + NEW_TOKENS))
    blocks = engine.shape_block_ids(ids)
    lo, hi = engine.shard.kv_heads.start, engine.shard.kv_heads.stop
    for cache, full in zip(engine.caches, source["kv"], strict=True):
        write_request(engine.config.cache.layout, cache, blocks, torch.from_numpy(full[:, lo:hi]))
    tokens = [source["first"]]
    while len(tokens) < NEW_TOKENS:
        request = DecodeRequest(token_id=tokens[-1], block_ids=blocks,
                                num_cached=len(PROMPT) + len(tokens) - 1)
        tokens.append(engine.decode([request]).tokens[0])
    return tokens


def run_rank(engine: Engine, source: dict | None, qwen2: Engine) -> dict:
    out = engine.generate(PROMPT, NEW_TOKENS)
    result = {"rank": engine.rank, "tokens": out.tokens, "logits": out.logits.numpy(),
              "dump": prefill_dump(engine)}
    if source is not None:
        result["transferred"] = decode_from(engine, source)
    out = qwen2.generate(PROMPT, NEW_TOKENS)  # q/k/v biases are sharded too
    result["qwen2"] = (out.tokens, out.logits.numpy())
    return result


def worker(rank: int, tp: int, port: int, layout: str, block_size: int, source, results) -> None:
    torch.set_num_threads(1)
    group = TPGroup.init(rank=rank, size=tp, init_method=f"tcp://127.0.0.1:{port}")
    try:
        qwen2 = Engine(engine_config(layout, block_size, "tiny-qwen2"), group)
        results.put(run_rank(Engine(engine_config(layout, block_size), group), source, qwen2))
    finally:
        group.close()


def run_group(tp: int, layout: str, block_size: int, source: dict | None) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.spawn(worker, args=(tp, free_port(), layout, block_size, source, results),
                     nprocs=tp, join=False)
    out = []
    try:
        while len(out) < tp:
            try:
                out.append(results.get(timeout=2))
            except queue_lib.Empty:
                procs.join(timeout=0.1)  # raises with the child's traceback if a rank failed
    finally:
        while not procs.join(timeout=60):
            pass
    return sorted(out, key=lambda r: r["rank"])


def assemble(dumps: list[dict]) -> dict:
    """Full-head KV from every rank's dump; replicated heads must agree exactly."""
    num_heads = preset("tiny").num_kv_heads
    layers = []
    for layer in range(len(dumps[0]["kv"])):
        kv = dumps[0]["kv"][layer]
        full = np.full((kv.shape[0], num_heads, *kv.shape[2:]), np.nan, dtype=kv.dtype)
        for dump in dumps:
            lo, hi = dump["heads"]
            if not np.isnan(full[:, lo:hi]).all():
                np.testing.assert_array_equal(full[:, lo:hi], dump["kv"][layer])
            full[:, lo:hi] = dump["kv"][layer]
        assert not np.isnan(full).any()
        layers.append(full)
    assert len({d["first"] for d in dumps}) == 1
    return {"first": dumps[0]["first"], "kv": layers}


@pytest.fixture(scope="module")
def chain():
    tp1 = run_rank(Engine(engine_config("flash-attn-nhd", 4)), None,
                   Engine(engine_config("flash-attn-nhd", 4, "tiny-qwen2")))
    tp2 = run_group(2, "flashinfer-hnd", 4, assemble([tp1["dump"]]))
    tp4 = run_group(4, "packed", 8, assemble([r["dump"] for r in tp2]))
    back = decode_from(Engine(engine_config("trtllm-hnd", 2)), assemble([r["dump"] for r in tp4]))
    return {1: [tp1], 2: tp2, 4: tp4, "back": back}


@pytest.mark.parametrize("tp", [2, 4])
def test_tokens_and_logits_equal_tp1(chain, tp):
    reference = chain[1][0]
    for result in chain[tp]:
        assert result["tokens"] == reference["tokens"]
        np.testing.assert_allclose(result["logits"], reference["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_qwen2_tokens_and_logits_equal_tp1(chain, tp):
    tokens, logits = chain[1][0]["qwen2"]
    for result in chain[tp]:
        assert result["qwen2"][0] == tokens
        np.testing.assert_allclose(result["qwen2"][1], logits, rtol=1e-5, atol=1e-5)


def test_prefill_kv_is_the_same_at_every_tp(chain):
    reference = assemble([chain[1][0]["dump"]])
    for tp in (2, 4):
        kv = assemble([r["dump"] for r in chain[tp]])
        for got, want in zip(kv["kv"], reference["kv"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_decode_from_kv_moved_by_hand_equals_tp1(chain, tp):
    for result in chain[tp]:
        assert result["transferred"] == chain[1][0]["tokens"]


def test_tp4_prefill_to_tp1_decode_with_separate_kv_pages(chain):
    assert chain["back"] == chain[1][0]["tokens"]
