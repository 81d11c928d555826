"""The reference Llama-family engine used by the standalone daemons (see README.md)."""

from kvxfer.engine.cache import AllocationError, BlockAllocator, KVCache
from kvxfer.engine.config import (
    PRESETS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    load_model_config,
    preset,
)
from kvxfer.engine.engine import BlockIds, DecodeRequest, Engine, StepOutput, StepRequest
from kvxfer.engine.model import Shard
from kvxfer.engine.parallel import TPGroup
from kvxfer.engine.sampling import GREEDY, SamplingParams
from kvxfer.engine.tokenizer import byte_level_tokenizer, load_tokenizer
from kvxfer.engine.weights import (
    SafetensorsSource,
    StateDictSource,
    random_state_dict,
    save_model_dir,
    write_random_model_dir,
)
from kvxfer.ports import free_port

__all__ = [
    "GREEDY",
    "PRESETS",
    "AllocationError",
    "BlockAllocator",
    "BlockIds",
    "CacheConfig",
    "DecodeRequest",
    "Engine",
    "EngineConfig",
    "KVCache",
    "ModelConfig",
    "SafetensorsSource",
    "SamplingParams",
    "Shard",
    "StateDictSource",
    "StepOutput",
    "StepRequest",
    "TPGroup",
    "byte_level_tokenizer",
    "free_port",
    "load_model_config",
    "load_tokenizer",
    "preset",
    "random_state_dict",
    "save_model_dir",
    "write_random_model_dir",
]
