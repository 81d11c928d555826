"""The engine of one TP rank: model shard, paged KV cache, block allocator, collective steps.

Every rank of a TP group builds its `Engine` with the same config and then calls the same step
(`prefill`, `decode` or `step`) with the same arguments, in the same order: the row-parallel
layers all-reduce inside the step. Every rank returns the same tokens; rank 0's are the ones a
daemon reports. Blocks are allocated by the caller (rank 0 decides, the others follow), so
every rank's allocator stays identical when each applies the same verbs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kvxfer.attention import PagedAttention, PageTable, WarmupRecord, WarmupShape, warmup
from kvxfer.engine.cache import BlockAllocator, KVCache
from kvxfer.engine.config import EngineConfig, ModelConfig
from kvxfer.engine.model import CausalLM, Shard
from kvxfer.engine.parallel import TPGroup
from kvxfer.engine.sampling import GREEDY, SamplingParams, sample
from kvxfer.engine.tokenizer import load_tokenizer
from kvxfer.engine.weights import (
    SafetensorsSource,
    StateDictSource,
    WeightSource,
    load_weights,
    random_state_dict,
)
from kvxfer.errors import ConfigError, LayoutError
from kvxfer.layouts import CacheDesc, check_block_ids, get_layout

log = logging.getLogger(__name__)

# A request's blocks: [n] ids, or [2, n] (K pages, V pages) for TRT-LLM layouts.
BlockIds = Sequence[int] | np.ndarray | torch.Tensor


@dataclass(frozen=True, kw_only=True)
class StepRequest:
    """New tokens of one request and where its KV lives.

    `block_ids` cover all `num_cached + len(token_ids)` tokens: `[n]` ints, or `[2, n]` (K pages,
    V pages) for TRT-LLM layouts. The first `num_cached` tokens' KV must already be in the cache
    (computed here, or transferred from another process); the new tokens' KV is written.
    """

    token_ids: Sequence[int]
    block_ids: BlockIds
    num_cached: int = 0
    sampling: SamplingParams = GREEDY


@dataclass(frozen=True, kw_only=True)
class DecodeRequest:
    """One decode step: `token_id` (not yet in the cache) goes at position `num_cached`."""

    token_id: int
    block_ids: BlockIds
    num_cached: int
    sampling: SamplingParams = GREEDY


@dataclass(frozen=True)
class StepOutput:
    tokens: list[int]  # one sampled token per request
    logits: torch.Tensor = field(repr=False)  # [batch, vocab] float32 on CPU


class Engine:
    """One rank's shard of the model and of the KV cache. Build with `Engine(config, group)`."""

    def __init__(self, config: EngineConfig, group: TPGroup | None = None, *,
                 weights: WeightSource | None = None) -> None:
        self.config = config.validate()
        self.group = group or TPGroup.single()
        model_config = self.model_config
        model_config.check_tp(self.group.size)
        self.device = _device_of(config, self.group)
        self.shard = Shard.of(model_config, self.group)
        self.model = CausalLM(model_config, self.shard, self.group)
        load_weights(self.model, weights or _default_weights(config))
        self.model.to(device=self.device, dtype=config.torch_dtype).eval()
        self.kv_cache = KVCache.allocate(model_config, config.cache, self.shard.kv_heads,
                                         dtype=config.torch_dtype, device=self.device)
        self.allocator = BlockAllocator(config.cache.num_blocks)
        self.attention = PagedAttention(
            layout=config.cache.layout, num_q_heads=self.shard.q_heads.size,
            num_kv_heads=self.shard.kv_heads.size, head_dim=model_config.head_dim,
            block_size=config.cache.block_size, dtype=config.torch_dtype, device=self.device,
            backend=config.attention_backend)
        self.tokenizer = load_tokenizer(config.model_dir) if config.model_dir else None
        log.info("engine rank %d/%d: q heads %s, kv heads %s, cache %s %s, attention %s on %s",
                 self.rank, self.tp, self.shard.q_heads, self.shard.kv_heads, config.cache.layout,
                 self.kv_cache.desc.shape, self.attention.backend, self.device)

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def tp(self) -> int:
        return self.group.size

    @property
    def caches(self) -> list[torch.Tensor]:
        """One tensor per layer, shaped `cache_desc.shape`."""
        return self.kv_cache.layers

    @property
    def cache_desc(self) -> CacheDesc:
        return self.kv_cache.desc

    @property
    def block_size(self) -> int:
        return self.config.cache.block_size

    @property
    def separate_kv_pages(self) -> bool:
        return get_layout(self.config.cache.layout).separate_kv_pages

    def blocks_needed(self, num_tokens: int) -> int:
        """Block ids a request of `num_tokens` tokens takes (twice that for separate K/V pages)."""
        pages = -(-num_tokens // self.block_size)
        return 2 * pages if self.separate_kv_pages else pages

    def shape_block_ids(self, block_ids: Sequence[int]) -> BlockIds:
        """Allocator ids as a step's `block_ids`: `[n]`, or `[2, n]` for separate K/V pages."""
        return np.asarray(block_ids).reshape(2, -1) if self.separate_kv_pages else list(block_ids)

    def warmup(self) -> list[WarmupRecord]:
        """Build and load this rank's attention kernels now (call before reporting ready); each
        kernel is logged with its name, seconds and what it compiled. Not collective."""
        shape = WarmupShape(self.config.cache.layout, self.shard.q_heads.size,
                            self.shard.kv_heads.size, self.model_config.head_dim, self.block_size,
                            self.config.torch_dtype)
        return warmup([shape], device=self.device)

    # ---- collective steps: every rank calls them with the same arguments --------------------

    def prefill(self, token_ids: Sequence[int], block_ids: BlockIds, *, num_cached: int = 0,
                sampling: SamplingParams = GREEDY) -> StepOutput:
        """Write the prompt's KV into `block_ids` and sample the first generated token."""
        request = StepRequest(token_ids=token_ids, block_ids=block_ids, num_cached=num_cached,
                              sampling=sampling)
        return self.step([request])

    def decode(self, batch: Sequence[DecodeRequest]) -> StepOutput:
        """One token per request, from KV already in the cache (computed or transferred)."""
        return self.step([
            StepRequest(token_ids=[r.token_id], block_ids=r.block_ids, num_cached=r.num_cached,
                        sampling=r.sampling)
            for r in batch
        ])

    @torch.inference_mode()
    def step(self, requests: Sequence[StepRequest]) -> StepOutput:
        """Run the model over every request's new tokens; sample one token per request."""
        table = self._page_table(requests)
        _, positions = table.token_slots()
        tokens = torch.tensor([t for r in requests for t in r.token_ids], dtype=torch.long,
                              device=self.device)
        last = torch.tensor(np.cumsum(table.q_lens) - 1, dtype=torch.long, device=self.device)
        self.attention.plan(table)
        logits = self.model(tokens, positions, self.caches, self.attention, last).cpu()
        sampled = sample(logits, [r.sampling for r in requests], list(table.kv_lens))
        return StepOutput(sampled, logits)

    def generate(self, token_ids: Sequence[int], max_new_tokens: int, *,
                 sampling: SamplingParams = GREEDY) -> StepOutput:
        """Prefill then decode with blocks from this rank's allocator; frees them at the end.

        Collective like the steps; returns the generated tokens and `[max_new_tokens, vocab]`
        logits. For tests, the demo's reference run and single-process use.
        """
        total = len(token_ids) + max_new_tokens
        ids = self.allocator.allocate(self.blocks_needed(total))
        try:
            blocks = self.shape_block_ids(ids)
            out = self.prefill(token_ids, blocks, sampling=sampling)
            tokens, logits = list(out.tokens), [out.logits]
            while len(tokens) < max_new_tokens:
                cached = len(token_ids) + len(tokens) - 1
                out = self.decode([DecodeRequest(token_id=tokens[-1], block_ids=blocks,
                                                 num_cached=cached, sampling=sampling)])
                tokens.append(out.tokens[0])
                logits.append(out.logits)
            return StepOutput(tokens, torch.cat(logits))
        finally:
            self.allocator.free(ids)

    def _page_table(self, requests: Sequence[StepRequest]) -> PageTable:
        if not requests:
            raise ConfigError("step: no requests")
        for i, r in enumerate(requests):
            if not r.token_ids:
                raise ConfigError(f"step: request {i} has no token_ids")
            end = r.num_cached + len(r.token_ids)
            if r.num_cached < 0 or end > self.model_config.max_position:
                raise ConfigError(f"step: request {i} spans positions [{r.num_cached}, {end}) outside "
                                  f"[0, {self.model_config.max_position})")
            check_block_ids(np.asarray(r.block_ids), self.cache_desc, who=f"step request {i}")
        try:
            return PageTable.build([r.block_ids for r in requests], [r.num_cached for r in requests],
                                   [len(r.token_ids) for r in requests], block_size=self.block_size,
                                   separate_kv_pages=self.separate_kv_pages, device=self.device)
        except RuntimeError as err:  # ragged or malformed block ids
            raise LayoutError(f"step: block ids do not fit the cache layout: {err}") from None


def _device_of(config: EngineConfig, group: TPGroup) -> torch.device:
    if config.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA device")
    device = torch.device("cuda", group.rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _default_weights(config: EngineConfig) -> WeightSource:
    if config.model_dir:
        return SafetensorsSource(config.model_dir)
    return StateDictSource(random_state_dict(config.model, config.seed))
