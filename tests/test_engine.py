"""The reference engine in one process: allocator, config, and `transformers` as the oracle."""

import dataclasses

import pytest
import torch

from kvxfer.engine import (
    AllocationError,
    BlockAllocator,
    CacheConfig,
    DecodeRequest,
    Engine,
    EngineConfig,
    SamplingParams,
    load_model_config,
    preset,
    write_random_model_dir,
)
from kvxfer.errors import ConfigError, LayoutError

PROMPT = [5, 17, 200, 3, 99, 42, 7, 64, 128, 1, 250]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def model_dir(tmp_path, name, **overrides):
    config = preset(name, **overrides)
    return config, write_random_model_dir(tmp_path / name, config, seed=3)


# ---- transformers as the oracle ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name,overrides,layout",
    [
        ("tiny", {}, "flashinfer-hnd"),
        ("tiny-qwen2", {}, "packed"),
        ("tiny", {"tie_word_embeddings": True}, "trtllm-nhd"),
    ],
    ids=["llama", "qwen2", "llama-tied"],
)
def test_matches_transformers(tmp_path, transformers, name, overrides, layout):
    config, path = model_dir(tmp_path, name, **overrides)
    engine = Engine(EngineConfig(model=config, cache=CacheConfig(layout=layout, block_size=4, num_blocks=32),
                                 model_dir=str(path)))
    ours = engine.generate(PROMPT, NEW_TOKENS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                           dtype=torch.float32)
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.family]
    with torch.no_grad():
        full = torch.tensor([PROMPT + ours.tokens[:-1]])
        hf_logits = hf(full).logits[0, len(PROMPT) - 1 :]  # [NEW_TOKENS, vocab]
    torch.testing.assert_close(ours.logits, hf_logits, rtol=1e-4, atol=1e-4)
    assert ours.tokens == hf_logits.argmax(-1).tolist()
    hf_tokens = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours.tokens == hf_tokens[0, len(PROMPT) :].tolist()
    assert engine.tokenizer is not None and engine.tokenizer.get_vocab_size() <= config.vocab_size


# ---- steps ------------------------------------------------------------------------------------


def tiny_engine(layout="flashinfer-hnd", block_size=4, **kw):
    cfg = EngineConfig(model=preset("tiny"), cache=CacheConfig(layout=layout, block_size=block_size,
                                                               num_blocks=32), seed=3, **kw)
    return Engine(cfg)


def test_batched_decode_equals_one_request_at_a_time():
    engine = tiny_engine()
    prompts = [PROMPT, PROMPT[:5], [9, 8, 7]]
    singles = [engine.generate(p, 4).tokens for p in prompts]
    blocks = [engine.allocator.allocate(engine.blocks_needed(len(p) + 4)) for p in prompts]
    firsts = [engine.prefill(p, b).tokens[0] for p, b in zip(prompts, blocks, strict=True)]
    tokens = [[t] for t in firsts]
    for _ in range(3):
        batch = [DecodeRequest(token_id=t[-1], block_ids=b, num_cached=len(p) + len(t) - 1)
                 for p, b, t in zip(prompts, blocks, tokens, strict=True)]
        for t, new in zip(tokens, engine.decode(batch).tokens, strict=True):
            t.append(new)
    assert tokens == singles


def test_chunked_prefill_equals_one_prefill():
    engine = tiny_engine(layout="flashinfer-nhd")
    whole = engine.generate(PROMPT, 1)
    blocks = engine.allocator.allocate(engine.blocks_needed(len(PROMPT)))
    engine.prefill(PROMPT[:6], blocks)
    second = engine.prefill(PROMPT[6:], blocks, num_cached=6)
    assert second.tokens == whole.tokens
    torch.testing.assert_close(second.logits, whole.logits, rtol=1e-5, atol=1e-5)


def test_temperature_sampling_is_seeded_by_request_and_position():
    engine = tiny_engine()
    hot = SamplingParams(temperature=1.5, seed=11)
    first = engine.generate(PROMPT, 8, sampling=hot).tokens
    assert engine.generate(PROMPT, 8, sampling=hot).tokens == first
    assert engine.generate(PROMPT, 8, sampling=SamplingParams(temperature=1.5, seed=12)).tokens != first
    assert engine.generate(PROMPT, 8).tokens != first  # greedy differs from sampling here


def test_engine_exposes_cache_tensors_matching_the_description():
    engine = tiny_engine(layout="packed", block_size=8)
    desc = engine.cache_desc
    assert (desc.layout, desc.num_heads, desc.first_head, desc.total_heads) == ("packed", 2, 0, 2)
    assert all(tuple(t.shape) == desc.shape for t in engine.caches)
    assert all(t.numel() * t.element_size() == desc.layer_bytes for t in engine.caches)


def test_step_refuses_blocks_outside_the_cache():
    engine = tiny_engine()
    with pytest.raises(LayoutError, match="block id 99 outside"):
        engine.prefill([1, 2, 3], [99])
    with pytest.raises(LayoutError, match="need 2 blocks, got 1"):
        engine.prefill([1, 2, 3, 4, 5], [0])


# ---- allocator --------------------------------------------------------------------------------


def test_allocator_paired_verbs_and_leases():
    alloc = BlockAllocator(4)
    assert alloc.can_allocate(4) and not alloc.can_allocate(5)
    ids = alloc.allocate(3)
    assert alloc.num_free == 1
    alloc.hold(ids[:2])  # a transfer lease keeps two blocks after the request is done
    alloc.free(ids)
    assert alloc.num_free == 2 and [alloc.refcount(b) for b in ids] == [1, 1, 0]
    alloc.release(ids[:2])
    assert alloc.num_free == 4
    with pytest.raises(AllocationError, match="release: block 0 is not allocated"):
        alloc.release([0])
    with pytest.raises(AllocationError, match="5 blocks asked, 4 of 4 free"):
        alloc.allocate(5)


def test_allocator_refuses_a_repeated_block():
    alloc = BlockAllocator(2)
    ids = alloc.allocate(1)
    alloc.hold(ids)
    with pytest.raises(AllocationError, match="repeat"):
        alloc.free(ids + ids)


# ---- config -----------------------------------------------------------------------------------


def test_presets_fit_their_tp_sizes():
    for tp in (1, 2, 4):
        preset("tiny").check_tp(tp)
        preset("tiny-demo").check_tp(tp)
    assert preset("tiny-demo").num_kv_heads == 4
    with pytest.raises(ConfigError, match="tp=3 neither divides"):
        preset("tiny").check_tp(3)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model.num_q_heads=6 is not a multiple of num_kv_heads=4"):
        preset("tiny-demo", num_q_heads=6)
    with pytest.raises(ConfigError, match="cache.layout='mla'"):
        CacheConfig(layout="mla").validate()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model_config(tmp_path)
    with pytest.raises(ConfigError, match="model preset 'huge'"):
        preset("huge")


def test_config_json_round_trip(tmp_path):
    config, path = model_dir(tmp_path, "tiny-qwen2")
    assert load_model_config(path) == config
    assert dataclasses.replace(config, family="llama").to_hf()["architectures"] == ["LlamaForCausalLM"]


# ---- warmup -----------------------------------------------------------------------------------


def test_engine_warmup_builds_its_own_shape():
    engine = tiny_engine(layout="packed")
    records = engine.warmup()
    assert [r.kernel.split()[:2] for r in records] == [["decode", "packed"], ["prefill", "packed"]]
    assert all("q_heads=4 kv_heads=2 head_dim=16 page=4 float32" in r.kernel for r in records)


def test_warmup_command_logs_every_rank_shape(tmp_path, caplog):
    from kvxfer.cli import main

    _, path = model_dir(tmp_path, "tiny")
    with caplog.at_level("INFO"):
        assert main(["warmup", "--model", str(path), "--tp", "1", "4", "--dtype", "float32"]) == 0
    kernels = [m for m in caplog.messages if m.startswith("warmup: torch kernel")]
    # TP 1: 4 q heads / 2 KV heads; TP 4: 1 q head / 1 KV head (replicated); decode + prefill each
    assert len(kernels) == 4 and sum("q_heads=1 kv_heads=1" in m for m in kernels) == 2
    assert main(["warmup", "--model", str(path), "--tp", "3"]) == 2
