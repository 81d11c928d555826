"""`kvxfer plan`: show, for one request, what each decode rank reads from which prefill rank.

Pure planning: no memory is touched. Layer addresses are offsets in one tensor per rank; run
`kvxfer bench` to move real bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from kvxfer.commands.geometry import Geometry, add_geometry_arguments, geometry_from_args
from kvxfer.layouts import CacheRegion, describe
from kvxfer.planning import Fallback, heads_of_rank, map_tp, pair, request_indices, request_spans
from kvxfer.tables import format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="print the transfer plan of one request (peers, heads, descriptors, bytes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_geometry_arguments(p)
    p.add_argument("--fallback", choices=[f.value for f in Fallback], default="none",
                   help="when heads are not contiguous per block (NHD slices, cross-layout): "
                        "'none' refuses, 'fine' accepts per-token spans (default: none)")
    p.add_argument("--random-blocks", action="store_true",
                   help="use random block ids (default: 0, 1, 2, ... which coalesce)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-blocks (default: 0)")
    p.add_argument("--bench", type=int, default=0, metavar="N",
                   help="also time planning the request N times and report the median")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    geo = geometry_from_args(args)
    rng = np.random.default_rng(args.seed)
    fallback = Fallback(args.fallback)
    mapping = map_tp(geo.kv_heads, geo.prefill_tp, geo.decode_tp)
    prefill = [_rank(geo, "prefill", r, rng, args.random_blocks) for r in range(geo.prefill_tp)]
    decode = [_rank(geo, "decode", r, rng, args.random_blocks) for r in range(geo.decode_tp)]
    rows: list[dict[str, Any]] = []
    timings: dict[str, list[float]] = {}
    for a in mapping.assignments:
        (d_region, d_ids), (p_region, p_ids) = decode[a.decode_rank], prefill[a.prefill_rank]
        plan = pair(d_region, p_region, a.heads, fallback=fallback)
        spans = request_spans(plan, d_ids, p_ids, geo.tokens)
        rows.append({
            "decode_rank": a.decode_rank,
            "prefill_rank": a.prefill_rank,
            "heads": [a.heads.start, a.heads.stop],
            "unit_bytes": plan.unit_bytes,
            "descriptors": spans.num_descriptors,
            "bytes": spans.num_bytes,
        })
        if args.bench:
            timings.setdefault("indices_us", []).append(
                _median_us(args.bench, lambda plan=plan, d=d_ids, p=p_ids: request_indices(plan, d, p, geo.tokens)))
            timings.setdefault("spans_us", []).append(
                _median_us(args.bench, lambda plan=plan, d=d_ids, p=p_ids: request_spans(plan, d, p, geo.tokens)))
    summary = {
        "direction": mapping.direction.value,
        "ratio": mapping.ratio,
        "descriptors": sum(r["descriptors"] for r in rows),
        "bytes": sum(r["bytes"] for r in rows),
        **{k: statistics.median(v) for k, v in timings.items()},
    }
    if args.json:
        print(json.dumps({"geometry": geo.__dict__, "peers": rows, **summary}))
        return 0
    print(_describe(geo, summary))
    print(format_table(
        ["decode rank", "prefill rank", "heads", "span bytes", "descriptors", "MiB"],
        [[r["decode_rank"], r["prefill_rank"], f"[{r['heads'][0]}, {r['heads'][1]})",
          r["unit_bytes"], r["descriptors"], r["bytes"] / 2**20] for r in rows],
    ))
    if timings:
        print(f"\nplanning one peer's request (median of {args.bench}): "
              f"{summary['indices_us']:.0f} us as prepped-list indices, "
              f"{summary['spans_us']:.0f} us as coalesced (N, 3) spans")
    return 0


def _rank(geo: Geometry, role: str, rank: int, rng: np.random.Generator, random_blocks: bool):
    prefill = role == "prefill"
    layout = geo.prefill_layout if prefill else geo.decode_layout
    tp = geo.prefill_tp if prefill else geo.decode_tp
    block_size = geo.prefill_block_size if prefill else geo.decode_block_size
    heads = heads_of_rank(geo.kv_heads, tp, rank, field=f"{role}_tp")
    needed = -(-geo.tokens // block_size)
    separate = layout.startswith("trtllm")
    pages = needed * (2 if separate else 1)
    desc = describe(layout, num_layers=geo.layers, num_blocks=2 * pages, block_size=block_size,
                    num_heads=heads.size, first_head=heads.start, total_heads=geo.kv_heads,
                    head_dim=geo.head_dim, dtype=geo.dtype)
    ids = rng.permutation(desc.num_blocks)[:pages] if random_blocks else np.arange(pages)
    if separate:
        ids = ids.reshape(2, needed)
    region = CacheRegion(desc, np.arange(geo.layers, dtype=np.uint64) * np.uint64(desc.layer_bytes))
    return region, ids


def _median_us(repeats: int, fn) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def _describe(geo: Geometry, summary: dict) -> str:
    layouts = geo.prefill_layout if geo.prefill_layout == geo.decode_layout else \
        f"{geo.prefill_layout} -> {geo.decode_layout}"
    blocks = geo.prefill_block_size if geo.prefill_block_size == geo.decode_block_size else \
        f"{geo.prefill_block_size} -> {geo.decode_block_size}"
    return (
        f"{geo.tokens} tokens, {geo.layers} layers, {geo.kv_heads} KV heads x {geo.head_dim} "
        f"{geo.dtype}, block {blocks}, {layouts}\n"
        f"prefill TP {geo.prefill_tp} -> decode TP {geo.decode_tp} ({summary['direction']}, "
        f"ratio {summary['ratio']}): {summary['descriptors']:,} descriptors, "
        f"{summary['bytes'] / 2**20:,.1f} MiB\n"
    )
