"""Cache-geometry flags shared by `kvxfer plan` and `kvxfer bench` (same names, same defaults).

Defaults describe the Llama-3-8B-shaped request used throughout the docs: 32 layers, 8 KV heads,
head_dim 128, bf16, block 16, 8192 tokens.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from kvxfer.errors import ConfigError
from kvxfer.layouts import DTYPE_BYTES, LAYOUTS


@dataclass(frozen=True)
class Geometry:
    prefill_layout: str
    decode_layout: str
    prefill_tp: int
    decode_tp: int
    kv_heads: int
    head_dim: int
    layers: int
    prefill_block_size: int
    decode_block_size: int
    tokens: int
    dtype: str


def add_geometry_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cache geometry")
    g.add_argument("--layout", choices=sorted(LAYOUTS), default="flashinfer-hnd",
                   help="cache layout of both sides (default: flashinfer-hnd)")
    g.add_argument("--prefill-layout", choices=sorted(LAYOUTS), help="prefill layout (default: --layout)")
    g.add_argument("--decode-layout", choices=sorted(LAYOUTS), help="decode layout (default: --layout)")
    g.add_argument("--prefill-tp", type=int, default=1, help="prefill tensor-parallel size (default: 1)")
    g.add_argument("--decode-tp", type=int, default=2, help="decode tensor-parallel size (default: 2)")
    g.add_argument("--kv-heads", type=int, default=8, help="KV heads of the model (default: 8)")
    g.add_argument("--head-dim", type=int, default=128, help="head dimension (default: 128)")
    g.add_argument("--layers", type=int, default=32, help="number of layers (default: 32)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per block, both sides (default: 16)")
    g.add_argument("--prefill-block-size", type=int, help="prefill block size (default: --block-size)")
    g.add_argument("--decode-block-size", type=int, help="decode block size (default: --block-size)")
    g.add_argument("--tokens", type=int, default=8192, help="tokens in the request (default: 8192)")
    g.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16",
                   help="cache dtype (default: bfloat16)")


def geometry_from_args(args: argparse.Namespace) -> Geometry:
    for flag in ("prefill_tp", "decode_tp", "kv_heads", "head_dim", "layers", "block_size", "tokens"):
        value = getattr(args, flag)
        if value <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')}={value} must be positive")
    for flag in ("prefill_block_size", "decode_block_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')}={value} must be positive")
    if "mla" in (args.prefill_layout or args.layout, args.decode_layout or args.layout) and args.kv_heads != 1:
        raise ConfigError(f"--layout mla has one latent per token: --kv-heads={args.kv_heads} must be 1")
    return Geometry(
        prefill_layout=args.prefill_layout or args.layout,
        decode_layout=args.decode_layout or args.layout,
        prefill_tp=args.prefill_tp,
        decode_tp=args.decode_tp,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        layers=args.layers,
        prefill_block_size=args.prefill_block_size or args.block_size,
        decode_block_size=args.decode_block_size or args.block_size,
        tokens=args.tokens,
        dtype=args.dtype,
    )
