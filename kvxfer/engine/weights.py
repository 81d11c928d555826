"""Where weights come from: random from a config and a seed, or a Hugging Face directory.

A `WeightSource` hands out slices of full tensors by Hugging Face name, so each rank reads only
its shard (safetensors slices are lazy). `save_model_dir` writes a directory `transformers` and
this engine both load: config.json, model.safetensors and, optionally, tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvxfer.engine.config import ModelConfig
from kvxfer.engine.model import CausalLM
from kvxfer.engine.tokenizer import byte_level_tokenizer
from kvxfer.errors import ConfigError


class WeightSource(Protocol):
    def get(self, name: str, part: tuple[int, int, int] | None) -> torch.Tensor:
        """The tensor `name`, or its slice (dim, start, stop)."""
        ...


def _take(tensor: torch.Tensor, part: tuple[int, int, int] | None) -> torch.Tensor:
    if part is None:
        return tensor
    dim, start, stop = part
    return tensor.narrow(dim, start, stop - start)


class StateDictSource:
    """Full tensors held in memory (random weights, tests)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def get(self, name: str, part: tuple[int, int, int] | None) -> torch.Tensor:
        if name not in self.tensors:
            raise ConfigError(f"weights: no tensor named {name!r}")
        return _take(self.tensors[name], part)


class SafetensorsSource:
    """A Hugging Face directory: model.safetensors or shards listed in its index file."""

    def __init__(self, model_dir: str | Path) -> None:
        root = Path(model_dir)
        index = root / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: root / file for name, file in weight_map.items()}
        elif (root / "model.safetensors").exists():
            with safe_open(root / "model.safetensors", framework="pt") as f:
                self.files = {name: root / "model.safetensors" for name in f.keys()}
        else:
            raise ConfigError(f"model directory {root}: no model.safetensors(.index.json)")

    def get(self, name: str, part: tuple[int, int, int] | None) -> torch.Tensor:
        if name not in self.files:
            raise ConfigError(f"weights: {self.files and next(iter(self.files.values())).parent} "
                              f"has no tensor named {name!r}")
        with safe_open(self.files[name], framework="pt") as f:
            if part is None:
                tensor: torch.Tensor = f.get_tensor(name)
                return tensor
            dim, start, stop = part
            index = tuple([slice(None)] * dim + [slice(start, stop)])
            sliced: torch.Tensor = f.get_slice(name)[index]
            return sliced


def load_weights(model: CausalLM, source: WeightSource) -> None:
    """Copy this rank's slice of every parameter from `source` (shapes checked by name)."""
    for name, param in model.named_parameters():
        part = model.shard.slice_of(name, model.config.head_dim)
        tensor = source.get(name, part)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ConfigError(f"weights: {name} slice {part} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))


def random_state_dict(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Full float32 weights, Hugging Face names, deterministic in (config, seed) on any machine.

    Scaled so activations stay O(1) and greedy argmax margins are far above fp32 rounding.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    h, d, f = config.hidden_size, config.head_dim, config.intermediate_size
    out = {"model.embed_tokens.weight": normal(config.vocab_size, h, std=1.0)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = 1.0 + normal(h, std=0.1)
        out[p + "post_attention_layernorm.weight"] = 1.0 + normal(h, std=0.1)
        for proj, heads in (("q_proj", config.num_q_heads), ("k_proj", config.num_kv_heads),
                            ("v_proj", config.num_kv_heads)):
            out[p + f"self_attn.{proj}.weight"] = normal(heads * d, h, std=h**-0.5)
            if config.qkv_bias:
                out[p + f"self_attn.{proj}.bias"] = normal(heads * d, std=0.1)
        out[p + "self_attn.o_proj.weight"] = normal(h, config.num_q_heads * d, std=(config.num_q_heads * d) ** -0.5)
        out[p + "mlp.gate_proj.weight"] = normal(f, h, std=h**-0.5)
        out[p + "mlp.up_proj.weight"] = normal(f, h, std=h**-0.5)
        out[p + "mlp.down_proj.weight"] = normal(h, f, std=f**-0.5)
    out["model.norm.weight"] = 1.0 + normal(h, std=0.1)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = normal(config.vocab_size, h, std=h**-0.5)
    return out


def save_model_dir(model_dir: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor],
                   *, tokenizer_json: str | None = None) -> Path:
    """Write a Hugging Face model directory (config.json, model.safetensors, tokenizer.json)."""
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer_json is not None:
        (root / "tokenizer.json").write_text(tokenizer_json)
    return root


def write_random_model_dir(model_dir: str | Path, config: ModelConfig, *, seed: int) -> Path:
    """A complete random model directory (weights from `seed`, byte-level tokenizer.json) that
    this engine and `transformers` both load: what the demo and the daemons' tests serve."""
    tokenizer = byte_level_tokenizer(config.vocab_size).to_str()
    return save_model_dir(model_dir, config, random_state_dict(config, seed), tokenizer_json=tokenizer)
