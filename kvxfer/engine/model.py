"""The Llama-family decoder, one rank's shard of it: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`), so loading is a
loop over `named_parameters()` with `Shard.slice_of(name)` telling which slice this rank holds.
Embedding, norms and the LM head are replicated; attention and MLP are split Megatron-style.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvxfer.attention import PagedAttention
from kvxfer.engine.config import ModelConfig
from kvxfer.engine.parallel import ColumnParallelLinear, RowParallelLinear, TPGroup
from kvxfer.planning import HeadRange, heads_of_rank


@dataclass(frozen=True)
class Shard:
    """What one rank holds: global q heads, global KV heads (replicated when tp > KV heads) and
    its slice of the MLP's intermediate features. The transfer planner's `heads_of_rank` is the
    one source of the KV-head split."""

    q_heads: HeadRange
    kv_heads: HeadRange
    ffn: HeadRange

    @classmethod
    def of(cls, config: ModelConfig, group: TPGroup) -> Shard:
        config.check_tp(group.size)
        q_per_rank = config.num_q_heads // group.size
        ffn_per_rank = config.intermediate_size // group.size
        r = group.rank
        return cls(
            q_heads=HeadRange(r * q_per_rank, (r + 1) * q_per_rank),
            kv_heads=heads_of_rank(config.num_kv_heads, group.size, r),
            ffn=HeadRange(r * ffn_per_rank, (r + 1) * ffn_per_rank),
        )

    def slice_of(self, name: str, head_dim: int) -> tuple[int, int, int] | None:
        """(dim, start, stop) of the full tensor `name` that this rank holds; None: all of it."""
        field = name.rsplit(".", 2)[-2]  # e.g. "q_proj" of "...self_attn.q_proj.weight"
        ranges = {
            "q_proj": (0, self.q_heads, head_dim),
            "k_proj": (0, self.kv_heads, head_dim),
            "v_proj": (0, self.kv_heads, head_dim),
            "o_proj": (1, self.q_heads, head_dim),
            "gate_proj": (0, self.ffn, 1),
            "up_proj": (0, self.ffn, 1),
            "down_proj": (1, self.ffn, 1),
        }
        if field not in ranges:
            return None
        dim, heads, unit = ranges[field]
        if name.endswith(".bias"):
            dim = 0
        return dim, heads.start * unit, heads.stop * unit


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]; normalised in float32, scaled in the input dtype (as Hugging Face does)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] -> cos, sin: [T, 1, head_dim] (halves repeated, "rotate half" style)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                               .float() / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard, group: TPGroup) -> None:
        super().__init__()
        d, h = config.head_dim, config.hidden_size
        self.head_dim = d
        self.num_q, self.num_kv = shard.q_heads.size, shard.kv_heads.size
        self.q_proj = ColumnParallelLinear(h, self.num_q * d, bias=config.qkv_bias, group=group)
        self.k_proj = ColumnParallelLinear(h, self.num_kv * d, bias=config.qkv_bias, group=group)
        self.v_proj = ColumnParallelLinear(h, self.num_kv * d, bias=config.qkv_bias, group=group)
        self.o_proj = RowParallelLinear(self.num_q * d, h, group=group)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: torch.Tensor, attn: PagedAttention) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        t, d = x.shape[0], self.head_dim
        q = apply_rope(self.q_proj(x).view(t, self.num_q, d), *rope)  # [T, Hq_local, D]
        k = apply_rope(self.k_proj(x).view(t, self.num_kv, d), *rope)  # [T, Hkv_local, D]
        v = self.v_proj(x).view(t, self.num_kv, d)
        attn.write(cache, k, v)
        out = attn.run(q, cache)  # [T, Hq_local, D]
        y: torch.Tensor = self.o_proj(out.reshape(t, self.num_q * d))
        return y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard, group: TPGroup) -> None:
        super().__init__()
        h, f = config.hidden_size, shard.ffn.size
        self.gate_proj = ColumnParallelLinear(h, f, bias=False, group=group)
        self.up_proj = ColumnParallelLinear(h, f, bias=False, group=group)
        self.down_proj = RowParallelLinear(f, h, group=group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        y: torch.Tensor = self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return y


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard, group: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, shard, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, shard, group)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: torch.Tensor, attn: PagedAttention) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, attn)
        y: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return y


class Decoder(nn.Module):
    """`model.*` of a Hugging Face checkpoint: embedding, layers, final norm."""

    def __init__(self, config: ModelConfig, shard: Shard, group: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, shard, group) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """One rank's shard of the whole model; `forward` runs one step over a paged cache."""

    def __init__(self, config: ModelConfig, shard: Shard, group: TPGroup) -> None:
        super().__init__()
        self.config, self.shard = config, shard
        self.model = Decoder(config, shard, group)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list[torch.Tensor],
                attn: PagedAttention, last: torch.Tensor) -> torch.Tensor:
        """tokens, positions: [T]; last: [B] index of each request's last token -> logits [B, vocab]
        (float32). `attn` must be planned for this step; each layer writes its KV into caches[i]."""
        x = self.model.embed_tokens(tokens)  # [T, hidden]
        rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer, cache in zip(self.model.layers, caches, strict=True):
            x = layer(x, rope, cache, attn)
        x = self.model.norm(x[last])  # [B, hidden]
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return nn.functional.linear(x, head).float()
