"""Greedy and temperature sampling.

Temperature sampling draws from a generator seeded by (request seed, position of the token), so
the same request gives the same tokens on every rank, and whether its prefill and its decode ran
in one process or in two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvxfer.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature} must not be negative")


GREEDY = SamplingParams()


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]) -> list[int]:
    """logits: [batch, vocab] float32; positions[b]: index the sampled token will have."""
    tokens = []
    for row, p, position in zip(logits, params, positions, strict=True):
        if p.temperature == 0:
            tokens.append(int(torch.argmax(row)))
            continue
        gen = torch.Generator().manual_seed(p.seed * 1_000_003 + position)
        probs = torch.softmax(row.float().cpu() / p.temperature, dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
    return tokens
