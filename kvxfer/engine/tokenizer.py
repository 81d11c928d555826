"""Tokenizers through the `tokenizers` package: a model directory's tokenizer.json, or a tiny
byte-level BPE trained on a few sentences for random models (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvxfer.errors import ConfigError

_SAMPLE_TEXT = [
    "Prefill workers compute the paged KV cache of a prompt.",
    "Decode workers read that cache over NIXL and generate one token at a time.",
    "The quick brown fox jumps over the lazy dog.",
]


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    """The directory's tokenizer.json, or None when it has none."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exceptions for malformed files
        raise ConfigError(f"{path}: not a tokenizer.json ({err})") from None


def byte_level_tokenizer(vocab_size: int, texts: list[str] | None = None) -> Tokenizer:
    """A byte-level BPE with at most `vocab_size` tokens (256 bytes plus learned merges)."""
    if vocab_size < 256:
        raise ConfigError(f"byte-level tokenizer needs vocab_size >= 256, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or _SAMPLE_TEXT, trainer=trainer)
    return tok
