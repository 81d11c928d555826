"""`kvxfer bench`: move one request's KV cache between real processes (one per rank) over NIXL,
through the daemons' transfer code (their endpoint, staging and command bus), and report bytes, descriptors, planning and transfer time, bandwidth, and the ratio to a
single-thread memcpy of the same bytes measured in the same run. `--json` prints one object as
the last line.

Defaults: the 8192-token Llama-3-8B-shaped request (32 layers, 8 KV heads, head_dim 128, bf16,
block 16), random block ids. UCX reads its own environment (e.g. UCX_TLS) in every rank.
"""

from __future__ import annotations

import argparse

import msgspec

from kvxfer.commands.geometry import add_geometry_arguments, geometry_from_args
from kvxfer.tables import format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a real transfer between rank processes and time it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_geometry_arguments(p)
    p.set_defaults(decode_tp=1)
    x = p.add_argument_group("transfer")
    x.add_argument("--mode", choices=["read", "write", "split", "auto"], default="auto",
                   help="read: decode pulls; write: prefill pushes; split: both at once, decode reading "
                        "the first half of the blocks, prefill writing the rest; auto: measure each, keep the fastest (default: auto)")
    x.add_argument("--plan", choices=["prepped", "spans", "per-block", "staged", "auto"], default="prepped",
                   help="prepped: tables once per peer + int32 indices (default); spans: coalesced "
                        "explicit spans; per-block: naive one descriptor per block unit; staged: "
                        "gather into a staging slot, one WRITE per part, scatter (with --mode write); auto: "
                        "calibrate the cost model on this fabric, pick prepped or staged, and measure both")
    x.add_argument("--fallback", choices=["none", "fine"], default="none",
                   help="accept per-token spans where heads are not contiguous (default: none)")
    x.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cache memory (default: cpu)")
    x.add_argument("--random-blocks", action=argparse.BooleanOptionalAction, default=True,
                   help="random block ids in a pool 25%% larger than the request (default: on)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--iters", type=int, default=5, help="timed runs after one warm-up (default: 5)")
    x.add_argument("--threading", choices=["app-poll", "progress-thread"], default="app-poll",
                   help="NIXL progress thread off (the app polls) or on (default: app-poll)")
    x.add_argument("--ucx-error-handling", choices=["none", "peer"], default="none",
                   help="UCX peer failure handling; 'none' enables shared-memory transports")
    x.add_argument("--num-workers", type=int, default=1, help="UCX workers per agent (default: 1)")
    x.add_argument("--num-threads", type=int, default=0,
                   help="UCX backend threads splitting each transfer (default: 0, none)")
    x.add_argument("--staged-groups", type=int, default=0,
                   help="--plan staged: 0 (default) or 1. The bench runs the daemons' staged path, "
                        "which moves each part as one WRITE (no pipeline of layer groups)")
    x.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=True,
                   help="host caches and the memcpy baseline on transparent huge pages (default: on)")
    x.add_argument("--verify", action="store_true",
                   help="decode ranks check every byte of the last run by torch indexing")
    x.add_argument("--dump", metavar="DIR",
                   help="write each rank's cache before/after the last run and its block ids as safetensors")
    x.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvxfer.bench.config import BenchConfig, PlanKind, StrategyChoice
    from kvxfer.bench.session import run_bench

    geo = geometry_from_args(args)
    cfg = BenchConfig(
        prefill_layout=geo.prefill_layout, decode_layout=geo.decode_layout,
        prefill_tp=geo.prefill_tp, decode_tp=geo.decode_tp, kv_heads=geo.kv_heads,
        head_dim=geo.head_dim, layers=geo.layers, prefill_block_size=geo.prefill_block_size,
        decode_block_size=geo.decode_block_size, tokens=geo.tokens, dtype=geo.dtype,
        mode=StrategyChoice(args.mode), plan=PlanKind(args.plan), fallback=args.fallback, device=args.device,
        random_blocks=args.random_blocks, seed=args.seed, iters=args.iters, verify=args.verify,
        dump=args.dump, threading=args.threading, error_handling=args.ucx_error_handling,
        num_workers=args.num_workers, num_threads=args.num_threads, huge_pages=args.huge_pages,
        staged_groups=args.staged_groups)
    result = run_bench(cfg)
    print(_table(result))
    if args.json:
        print(msgspec.json.encode(result).decode())
    return 0 if result.verified is not False else 1


def _table(r) -> str:
    rows = [
        ("mode", r.mode), ("plan", r.plan), ("prefill_tp -> decode_tp", f"{r.prefill_tp} -> {r.decode_tp}"),
        ("threading", r.threading), ("ucx error handling", r.error_handling),
        ("huge pages", r.huge_pages), ("ucx workers / threads", f"{r.num_workers} / {r.num_threads}"),
        ("bytes", r.bytes), ("descriptors (posted)", r.descriptors),
        ("descriptors (after NIXL merge)", r.nixl_descriptors), ("transfers", r.num_transfers),
        ("plan_us", r.plan_us), ("post_us", r.post_us), ("transfer_ms (median)", r.transfer_ms),
        ("transfer_ms (all)", ", ".join(f"{t:.2f}" for t in r.transfer_ms_all)),
        ("gbps (median)", r.gbps), ("memcpy_gbps (median)", r.memcpy_gbps),
        ("ratio (median of per-run ratios)", r.ratio),
        ("ratio (all)", ", ".join(f"{x:.2f}" for x in r.ratio_all)),
        ("verified", "not checked" if r.verified is None else r.verified),
        ("notification round trip (us)", r.notif_rtt_us),
    ]
    if r.gpu_sharing:
        rows.append(("GPU sharing", r.gpu_sharing))
    if r.phases_ms:
        rows.append(("staged steps (ms from start)", ", ".join(f"{k} {v:.3f}" for k, v in r.phases_ms.items())))
    if r.auto:
        rows.append(("auto (gbps)", ", ".join(f"{k} {v:.2f}" for k, v in r.auto.items())))
    if r.cost_model:
        cm = r.cost_model
        rows.append(("cost model estimates (ms)", ", ".join(f"{k} {v:.3f}" for k, v in cm["estimates_ms"].items())))
        rows.append(("cost model choice", f"{cm['choice']} ({cm['direct_descriptors']:,} direct descriptors)"))
        rows.append(("measured (gbps)", ", ".join(f"{k} {v:.2f}" for k, v in cm["measured_gbps"].items())
                     + ("; picked the faster" if cm["picked_faster"] else "; picked the SLOWER")))
        rows.append(("speed-up over per-block", f"{cm['speedup_over_per_block']:.1f}x ({r.gbps:.2f} / "
                     f"{cm['measured_gbps']['per-block']:.2f} GB/s)"))
    return format_table(["", "value"], rows)
