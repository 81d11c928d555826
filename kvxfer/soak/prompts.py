"""The soak's prompts (mixed lengths, fixed by a seed) and their single-process answers, the
oracle every reply is checked against token for token."""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = ("prefill", "decode", "cache", "block", "head", "layer", "token", "lease", "rank", "NIXL",
         "transfer", "the", "a", "of", "paged", "KV", "slice", "epoch", "peer", "deadline")


@dataclass(frozen=True)
class Prompt:
    text: str
    reference: tuple[int, ...]  # greedy tokens of a one-process run, max_tokens long


def prompt_texts(num: int, max_chars: int, seed: int) -> list[str]:
    """`num` prompts whose lengths spread evenly over [1, max_chars] characters."""
    rng = random.Random(seed)
    texts = []
    for i in range(num):
        length = max(1, round(max_chars * (i + 1) / num))
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < length:  # bounded: every word adds >= 2 chars
            words.append(rng.choice(WORDS))
        texts.append(" ".join(words)[:length])
    return texts


def reference_prompts(texts: list[str], *, preset: str, seed: int, max_tokens: int) -> list[Prompt]:
    """Greedy answers of the same model in this process at TP 1."""
    from kvxfer.engine.config import CacheConfig, EngineConfig
    from kvxfer.engine.config import preset as model_preset
    from kvxfer.engine.engine import Engine
    from kvxfer.engine.tokenizer import byte_level_tokenizer

    model = model_preset(preset)
    longest = max(len(t) for t in texts) + max_tokens
    engine = Engine(EngineConfig(model=model, cache=CacheConfig(num_blocks=-(-longest // 16) + 4), seed=seed))
    tokenizer = byte_level_tokenizer(model.vocab_size)
    return [Prompt(t, tuple(engine.generate(tokenizer.encode(t).ids, max_tokens).tokens)) for t in texts]
