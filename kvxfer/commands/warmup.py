"""`kvxfer warmup`: build every kernel a model's daemons will run, ahead of time: FlashInfer's
attention kernels (JIT-built libraries) and, on CUDA, the staging copiers' Triton kernels for
each pairing of prefill and decode TP sizes a staged WRITE can meet (`--pairs`).

Run it while building a container image with `--cache-dir` inside the image, and start the
services with `kvxfer serve --kernel-cache` on the same directory (it may be read-only by then):
a restarted pod loads every kernel instead of compiling it. Each kernel is logged with its name,
seconds and whether it compiled or loaded; the last line counts both.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kvxfer.errors import ConfigError
from kvxfer.kernels import KERNELS, use_cache_dir

if TYPE_CHECKING:
    import torch

    from kvxfer.engine import CacheConfig, ModelConfig, TPGroup
    from kvxfer.layouts import CacheRegion
    from kvxfer.planning import PairPlan

log = logging.getLogger("kvxfer.warmup")
COPIER_BLOCKS = 8  # blocks per layer of the caches copiers are built on (kernels do not depend on it)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("warmup", help="compile attention kernels ahead of time",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory, or a preset name")
    p.add_argument("--tp", type=int, nargs="+", default=[1],
                   help="TP sizes whose attention kernels to build (default: 1; --pairs adds theirs)")
    p.add_argument("--layout", nargs="+", default=["flashinfer-hnd"], help="cache layouts")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--pairs", nargs="+", default=["1:1"], metavar="PREFILL_TP:DECODE_TP",
                   help="TP pairings whose staging copiers to build, both sides (default: 1:1); a copier "
                        "depends on the layouts, the heads each rank moves, dtype and block size")
    p.add_argument("--cache-dir", default=None,
                   help="where the kernels land (Triton's under <dir>/triton, FlashInfer's under "
                        "<dir>/.cache/flashinfer): the directory `kvxfer serve --kernel-cache` reads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pairs = [_pair(text) for text in args.pairs]
    if args.cache_dir:  # read by FlashInfer and Triton when first imported, below
        use_cache_dir(args.cache_dir)
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
        for tp in sorted(set(args.tp) | {size for p in pairs for size in p}):
            for rank in range(tp):
                shard = Shard.of(model, TPGroup(rank, tp))
                shapes.append(attention.WarmupShape(layout, shard.q_heads.size, shard.kv_heads.size,
                                                    model.head_dim, args.block_size, DTYPES[args.dtype]))
    start = time.perf_counter()
    records = attention.warmup(shapes, device=device)
    compiled = sorted({lib for r in records for lib in r.compiled})
    log.info("warmup: %d attention kernels on %s in %.1f s, %d libraries compiled%s", len(records), device,
             time.perf_counter() - start, len(compiled), f" ({', '.join(compiled)})" if compiled else "")
    if device == "cpu":
        log.info("warmup: no CUDA device: the torch attention path and torch staging have nothing to compile")
        return 0
    copiers = 0
    for layout in args.layout:
        for prefill_tp, decode_tp in pairs:
            jobs = copier_jobs(model, CacheConfig(layout=layout, block_size=args.block_size, num_blocks=COPIER_BLOCKS),
                               prefill_tp, decode_tp, dtype=DTYPES[args.dtype], device=torch.device(device))
            warm_copiers(jobs)
            copiers += len(jobs)
    builds = KERNELS.builds()
    log.info("warmup: %d staging copiers; kernels: %d compiled, %d loaded from the cache, in %.1f s", copiers,
             sum(b.compiled for b in builds), sum(not b.compiled for b in builds), time.perf_counter() - start)
    return 0


def _pair(text: str) -> tuple[int, int]:
    try:
        prefill, decode = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--pairs {text!r}: expected PREFILL_TP:DECODE_TP, e.g. 2:4") from None
    if prefill < 1 or decode < 1:
        raise ConfigError(f"--pairs {text!r}: TP sizes must be positive")
    return prefill, decode


@dataclass(frozen=True)
class CopierJob:
    """One staging copier a pairing needs, as the daemons build it (kvxfer.agents.staged_transfer):
    a prefill rank's gather of one decode rank's heads, or a decode rank's scatter of all its
    sources, here on a small cache of the same geometry (the kernels do not depend on sizes)."""

    plans: list[PairPlan]  # the copier's side is each plan's local one
    layers: list[torch.Tensor]
    to_slot: bool  # gather (prefill) or scatter (decode)
    max_tokens: int

    @property
    def buffer_bytes(self) -> int:
        return sum(p.units_per_layer(self.max_tokens) * p.unit_bytes for p in self.plans) * len(self.layers)


def copier_jobs(model: ModelConfig, cache: CacheConfig, prefill_tp: int, decode_tp: int, *, dtype: torch.dtype,
                device: torch.device) -> list[CopierJob]:
    """Every copier of a prefill TP -> decode TP pairing, both sides (pairings whose parts differ
    in more than their heads are copied with torch indexing: no job)."""
    from kvxfer.agents.unit_copy import can_share
    from kvxfer.engine import TPGroup
    from kvxfer.planning import Fallback, map_tp, pair

    prefill = [_region(model, cache, TPGroup(r, prefill_tp), dtype, device) for r in range(prefill_tp)]
    decode = [_region(model, cache, TPGroup(r, decode_tp), dtype, device) for r in range(decode_tp)]
    mapping = map_tp(model.num_kv_heads, prefill_tp, decode_tp)
    sides = [([pair(prefill[a.prefill_rank][0], decode[a.decode_rank][0], a.heads, fallback=Fallback.FINE)],
              prefill[a.prefill_rank][1], True) for a in mapping.assignments]
    sides += [([pair(decode[d][0], prefill[s.prefill_rank][0], s.heads, fallback=Fallback.FINE)
                for s in mapping.sources_of(d)], decode[d][1], False) for d in range(decode_tp)]
    jobs = [CopierJob(plans, layers, to_slot, plans[0].chunk_tokens) for plans, layers, to_slot in sides]
    return [job for job in jobs if can_share(job.plans, 0, job.max_tokens)]


def warm_copiers(jobs: list[CopierJob]) -> None:
    """Build each copier (Triton compiles or loads its kernel) and capture its graph."""
    import torch

    from kvxfer.agents.unit_copy import UnitCopier

    for job in jobs:
        buffer = torch.empty(job.buffer_bytes, dtype=torch.uint8, device=job.layers[0].device)
        UnitCopier(job.plans, 0, job.layers, buffer, max_tokens=job.max_tokens, to_slot=job.to_slot).warm()


def _region(model: ModelConfig, cache: CacheConfig, group: TPGroup, dtype: torch.dtype,
            device: torch.device) -> tuple[CacheRegion, list[torch.Tensor]]:
    from kvxfer.agents.nixl_agent import device_id
    from kvxfer.engine import Shard
    from kvxfer.engine.cache import KVCache
    from kvxfer.layouts import CacheRegion

    kv = KVCache.allocate(model, cache, Shard.of(model, group).kv_heads, dtype=dtype, device=device)
    return CacheRegion(kv.desc, np.array(kv.layer_addrs, dtype=np.uint64), device_id(kv.layers[0])), kv.layers
