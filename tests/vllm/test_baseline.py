"""One plain vLLM instance (no connector): the reference every P/D run is compared with."""

from __future__ import annotations

from vllm_cases import BASELINE_PROMPTS, MAX_TOKENS


def test_plain_greedy_tokens(plain_tokens: dict[str, list[int]]) -> None:
    assert list(plain_tokens) == BASELINE_PROMPTS
    for prompt, tokens in plain_tokens.items():
        assert len(tokens) == MAX_TOKENS, prompt
    # Random weights still give prompt-dependent output; identical outputs would make the P/D
    # comparisons below meaningless.
    assert len({tuple(t) for t in plain_tokens.values()}) == len(BASELINE_PROMPTS)
