"""Typed configuration of the reference engine: the model, its paged cache, and presets.

`ModelConfig` reads and writes Hugging Face `config.json` dictionaries (Llama and Qwen2
families). Validation raises `ConfigError` naming the field, the value and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kvxfer.errors import ConfigError
from kvxfer.layouts import LAYOUTS

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Llama-family decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP."""

    family: str = "llama"  # "llama" or "qwen2" (q/k/v projections with bias)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position: int = 4096
    tie_word_embeddings: bool = False

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    def validate(self) -> ModelConfig:
        if self.family not in ARCHITECTURES:
            raise ConfigError(f"model.family={self.family!r} is not one of {sorted(ARCHITECTURES)}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_q_heads", "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"model.{field}={getattr(self, field)} must be positive")
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_q_heads={self.num_q_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for RoPE")
        return self

    def check_tp(self, tp: int) -> None:
        """Refuse a TP size this model cannot be split over."""
        if tp <= 0:
            raise ConfigError(f"tp={tp} must be positive")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise ConfigError(f"tp={tp} neither divides nor is a multiple of num_kv_heads={self.num_kv_heads}")
        for field in ("num_q_heads", "intermediate_size"):
            if getattr(self, field) % tp:
                raise ConfigError(f"tp={tp} does not divide model.{field}={getattr(self, field)}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face config.json dictionary."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ARCHITECTURES:
            raise ConfigError(f"config.json model_type={model_type!r} is not one of {sorted(ARCHITECTURES)}")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"config.json rope type {rope.get('rope_type', rope.get('type'))!r} is not "
                              f"supported (default RoPE only)")
        heads = int(hf["num_attention_heads"])
        return cls(
            family=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_q_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads", heads)),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        ).validate()

    def to_hf(self) -> dict[str, Any]:
        """A config.json dictionary that `transformers` loads as the same model."""
        return {
            "architectures": [ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_q_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "torch_dtype": "float32",
        }


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"model directory {model_dir}: no config.json") from None
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{path}: {err!r}") from None


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """One rank's paged KV cache: layout, block size and number of blocks (per layer)."""

    layout: str = "flashinfer-hnd"
    block_size: int = 16
    num_blocks: int = 256

    def validate(self) -> CacheConfig:
        if self.layout not in LAYOUTS or self.layout == "mla":
            raise ConfigError(f"cache.layout={self.layout!r} is not one of "
                              f"{sorted(set(LAYOUTS) - {'mla'})} (MLA needs an MLA model)")
        for field in ("block_size", "num_blocks"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"cache.{field}={getattr(self, field)} must be positive")
        return self


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Everything one rank needs to build its engine; the CLI fills it from flags."""

    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    dtype: str = "float32"
    device: str = "cpu"  # "cpu" or "cuda" (each rank takes cuda:<local rank>)
    model_dir: str | None = None  # Hugging Face directory; None: random weights from `seed`
    seed: int = 0
    attention_backend: str = "auto"  # "auto", "torch" or "flashinfer"

    def validate(self) -> EngineConfig:
        self.model.validate()
        self.cache.validate()
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device={self.device!r} is not 'cpu' or 'cuda'")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # Tests: 2 KV heads, so TP 4 replicates each KV head on two ranks.
    "tiny": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_q_heads=4, num_kv_heads=2, head_dim=16),
    # The demo: 4 KV heads, valid at TP 1, 2 and 4 without replication.
    "tiny-demo": ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                             num_q_heads=8, num_kv_heads=4, head_dim=16),
    "tiny-qwen2": ModelConfig(family="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                              num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16),
    # GPU check: head_dim 128 so FlashInfer has kernels; still small enough to start in seconds.
    "small-gpu": ModelConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=4,
                             num_q_heads=8, num_kv_heads=4, head_dim=128),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    try:
        return replace(PRESETS[name], **overrides).validate()
    except KeyError:
        raise ConfigError(f"model preset {name!r} is not one of {sorted(PRESETS)}") from None
