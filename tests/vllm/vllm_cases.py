"""Prompts and lengths shared by the vLLM tests (a module of its own: conftest is not importable
under one name when tests/ and tests/vllm/ both have one)."""

# Several prompts: 10, 84 and 310 tokens: one partial block and three blocks at vLLM's CPU block
# size of 128.
PROMPTS = [
    "The quick brown fox",
    "Paged attention keeps the key and value cache in fixed-size blocks. " * 3,
    " ".join(f"token{i} of a long prompt that spans several cache blocks" for i in range(10)),
]
MAX_TOKENS = 16

# Shares PROMPTS[2]'s first two blocks: a consumer that loaded PROMPTS[2] hits its prefix cache for
# 256 tokens and loads only the rest (in WRITE mode that load falls back to READ).
PREFIX_PROMPT = PROMPTS[2] + " and then a different ending"
# Prefilled by a producer that is then killed before the consumer loads it.
ORPHAN_PROMPT = "A lease holds blocks until every consumer confirms."
BASELINE_PROMPTS = [*PROMPTS, PREFIX_PROMPT, ORPHAN_PROMPT]
