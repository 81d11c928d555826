"""`kvxfer warmup`: build every attention kernel a model's daemons will need, ahead of time.

FlashInfer compiles kernels just in time into its cache directory. Running this while building a
container image (with `--cache-dir` pointing inside the image) lets a restarted pod start
without compiling. Each kernel is logged with its name, elapsed seconds and what it compiled.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from kvxfer.errors import ConfigError

log = logging.getLogger("kvxfer.warmup")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("warmup", help="compile attention kernels ahead of time",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory, or a preset name")
    p.add_argument("--tp", type=int, nargs="+", default=[1], help="TP sizes to build for (default: 1)")
    p.add_argument("--layout", nargs="+", default=["flashinfer-hnd"], help="cache layouts")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--cache-dir", default=None,
                   help="FlashInfer's workspace base (FLASHINFER_WORKSPACE_BASE); kernels land in "
                        "<dir>/.cache/flashinfer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.cache_dir:
        # Read by FlashInfer when it is first imported, which happens below.
        os.environ["FLASHINFER_WORKSPACE_BASE"] = str(Path(args.cache_dir).resolve())
    import torch

    from kvxfer import attention
    from kvxfer.engine import CacheConfig, Shard, TPGroup, load_model_config, preset
    from kvxfer.engine.config import DTYPES

    model = load_model_config(args.model) if Path(args.model).is_dir() else preset(args.model)
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype={args.dtype!r} is not one of {sorted(DTYPES)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = []
    for layout in args.layout:
        CacheConfig(layout=layout, block_size=args.block_size).validate()
        for tp in args.tp:
            for rank in range(tp):
                shard = Shard.of(model, TPGroup(rank, tp))
                shapes.append(attention.WarmupShape(layout, shard.q_heads.size, shard.kv_heads.size,
                                                    model.head_dim, args.block_size, DTYPES[args.dtype]))
    start = time.perf_counter()
    records = attention.warmup(shapes, device=device)
    compiled = sorted({lib for r in records for lib in r.compiled})
    log.info("warmup: %d kernels on %s in %.1f s, %d libraries compiled%s", len(records), device,
             time.perf_counter() - start, len(compiled), f" ({', '.join(compiled)})" if compiled else "")
    if device == "cpu":
        log.info("warmup: no CUDA device, the torch attention path has nothing to compile")
    return 0
