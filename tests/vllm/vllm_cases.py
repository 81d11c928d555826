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
