"""What a service rank is built from: its engine configuration (cache sized to the GPU's free
memory and its staging area), the fingerprint peers compare at handshake and its collective
backend. `runtime.build_runtime` builds a rank from a `RankSetup`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from kvxfer.agents.staged_transfer import PROBE_BYTES, SLOT_ALIGN, StagingConfig
from kvxfer.daemons.config import ServeConfig
from kvxfer.engine.config import CacheConfig, EngineConfig, load_model_config, preset
from kvxfer.errors import ConfigError


def engine_config(config: ServeConfig) -> EngineConfig:
    model = load_model_config(config.model_dir) if config.model_dir else preset(config.preset or "tiny-demo")
    num_blocks = config.num_blocks or blocks_for_memory(config, model)
    cache = CacheConfig(layout=config.layout, block_size=config.block_size, num_blocks=num_blocks)
    return EngineConfig(model=model, cache=cache, dtype=config.dtype, device=config.device.value,
                        model_dir=str(config.model_dir) if config.model_dir else None, seed=config.seed)


def blocks_for_memory(config: ServeConfig, model) -> int:
    """Cache blocks per rank that fit `memory_fraction` of the GPU's free memory, after this
    rank's share of the weights (estimated from the config: weights are loaded after the cache
    is sized) and its staging area (`--staging-mib` plus the calibration probe area)."""
    import torch

    from kvxfer.engine.config import DTYPES

    item = torch.tensor([], dtype=DTYPES[config.dtype]).element_size()
    free, _ = torch.cuda.mem_get_info()
    h, f, layers = model.hidden_size, model.intermediate_size, model.num_layers
    per_layer = h * (model.num_q_heads + 2 * model.num_kv_heads) * model.head_dim + h * h + 3 * h * f
    weights = (layers * per_layer + 2 * model.vocab_size * h) * item // config.tp
    kv_heads = max(1, model.num_kv_heads // config.tp)
    block_bytes = 2 * kv_heads * config.block_size * model.head_dim * item * layers
    staging = (config.staging_mib << 20) + PROBE_BYTES
    budget = int(free * (config.memory_fraction or 0.9)) - weights - staging
    if budget < block_bytes:
        raise ConfigError(f"--memory-fraction={config.memory_fraction}: {free / 2**30:.1f} GiB free on the GPU "
                          f"leaves no room for one cache block after {weights / 2**30:.1f} GiB of weights and "
                          f"{staging / 2**30:.2f} GiB of staging (--staging-mib)")
    return budget // block_bytes


def staging_config(config: ServeConfig, *, max_tokens: int) -> StagingConfig:
    """`--staging-mib` split into `--staging-slots` slots of whole pages (a slot size that is not
    a multiple of 16 bytes would misalign every slot after the first)."""
    slots = max(1, config.staging_slots)
    slot_bytes = (config.staging_mib << 20) // slots // SLOT_ALIGN * SLOT_ALIGN
    return StagingConfig(slot_bytes=slot_bytes, num_slots=slots, max_tokens=max_tokens)


def model_fingerprint(engine: EngineConfig) -> str:
    """Architecture and dtype: what must agree for KV to mean the same on both sides. (Weights
    are not hashed: a checkpoint mismatch is the operator's to avoid, as in every connector.)"""
    arch = json.dumps({"model": engine.model.to_hf(), "dtype": engine.dtype}, sort_keys=True)
    return hashlib.sha256(arch.encode()).hexdigest()[:16]


def collective_backend(config: ServeConfig) -> str:
    """NCCL when every rank has a GPU of its own; gloo otherwise (CPU, or several ranks sharing
    one GPU, which NCCL refuses)."""
    if config.device.value != "cuda":
        return "gloo"
    import torch

    return "nccl" if torch.cuda.device_count() >= config.tp else "gloo"


@dataclass(frozen=True)
class RankSetup:
    """Everything a rank process needs to build itself (picklable for spawn)."""

    config: ServeConfig
    rank: int
    boot_epoch: int
    dist_init: str  # torch.distributed init method shared by the group
