"""`kvxfer demo`: the main job. Starts a prefill service (TP 2), a decode service (TP 4) and the
proxy on loopback with a small random Llama model and CURVE keys, sends a handful of prompts
through the proxy, checks every answer token for token against a single-process run of the same
model, and prints one row per request. Exit status 0 only if every answer matched. Every process
it started is stopped at the end, also on Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import httpx
import rich.progress
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from kvxfer.daemons.cluster import LocalCluster, ServiceSpec
from kvxfer.layouts import LAYOUTS
from kvxfer.tables import format_table

log = logging.getLogger("kvxfer.demo")

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Prefill workers compute the paged KV cache of a prompt.",
    "Decode workers read that cache over NIXL",
    "Heterogeneous tensor parallelism: two prefill ranks feed four decode ranks, each a slice of "
    "the KV heads, with no copy on either side.",
    "kvxfer",
    "A longer prompt fills several cache blocks, so the transfer plan has to stitch together "
    "blocks that live at random places in both caches, head slice by head slice, layer by layer.",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run prefill TP 2 -> decode TP 4 on loopback and check every answer",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill-tp", type=int, default=2, help="prefill TP size (default: 2)")
    p.add_argument("--decode-tp", type=int, default=4, help="decode TP size (default: 4)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="flashinfer-hnd", help="both layouts (default: flashinfer-hnd)")
    p.add_argument("--prefill-layout", choices=sorted(LAYOUTS), help="prefill layout (default: --layout)")
    p.add_argument("--decode-layout", choices=sorted(LAYOUTS), help="decode layout (default: --layout)")
    p.add_argument("--block-size", type=int, default=16, help="both block sizes (default: 16)")
    p.add_argument("--prefill-block-size", type=int, help="prefill block size (default: --block-size)")
    p.add_argument("--decode-block-size", type=int, help="decode block size (default: --block-size)")
    p.add_argument("--mode", choices=["read", "write", "auto"], default="read", help="transfer mode (default: read)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of both services (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="model and cache dtype; FlashInfer needs 16-bit (default: float32)")
    p.add_argument("--preset", default="tiny-demo", help="random model preset (default: tiny-demo)")
    p.add_argument("--model", type=Path, help="Hugging Face model directory instead of --preset")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--max-tokens", type=int, default=12, help="tokens to generate per prompt (default: 12)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many prompts (default: {len(PROMPTS)})")
    p.add_argument("--meet-producers", action=argparse.BooleanOptionalAction, default=True,
                   help="decode meets prefill before /ready (`kvxfer serve decode --producers`: handshakes, "
                        "descriptor lists, calibration); off: only the proxy's introduction, in the "
                        "background, races the first request (default: on)")
    p.add_argument("--insecure-plaintext", action="store_true", help="no CURVE on the side channel")
    p.add_argument("--workdir", type=Path, help="logs and keys (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvxfer-demo-"))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    progress = Progress(total=2 + len(prompts))
    progress.step("reference run (one process)")
    reference = reference_tokens(args, prompts)
    cluster = LocalCluster(
        workdir=workdir,
        prefill=[ServiceSpec("prefill", args.prefill_tp, args.prefill_layout or args.layout,
                             args.prefill_block_size or args.block_size)],
        decode=[ServiceSpec("decode", args.decode_tp, args.decode_layout or args.layout,
                            args.decode_block_size or args.block_size, meet_producers=args.meet_producers)],
        preset=args.preset, model_dir=args.model, seed=args.seed, device=args.device, mode=args.mode,
        insecure=args.insecure_plaintext, extra=("--dtype", args.dtype))
    rows = []
    try:
        progress.step(f"starting prefill TP {args.prefill_tp}, decode TP {args.decode_tp}, proxy (logs: {workdir})")
        cluster.start()
        with httpx.Client(timeout=120.0) as client:
            for i, (prompt, want) in enumerate(zip(prompts, reference, strict=True)):
                progress.step(f"request {i + 1}/{len(prompts)}")
                rows.append(ask(client, cluster.url, prompt, want, args.max_tokens))
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process", file=sys.stderr)
        return 130
    finally:
        progress.done()
        cluster.stop()
    print(format_table(["#", "prompt", "tokens", "match", "path", "KiB moved", "descriptors", "transfer ms", "GB/s"],
                       [[i + 1, r["prompt"][:28], r["tokens"], "yes" if r["match"] else "NO", r["path"],
                         r["bytes"] / 1024, r["descriptors"], r["transfer_ms"], r["gbps"]]
                        for i, r in enumerate(rows)]))
    matched = sum(r["match"] for r in rows)
    print(f"\n{matched}/{len(rows)} answers equal the single-process run token for token "
          f"(prefill TP {args.prefill_tp} -> decode TP {args.decode_tp}, {args.mode}, {args.device})")
    if args.json:
        print(json.dumps({"requests": rows, "matched": matched, "total": len(rows), **transfer_figures(rows)}))
    return 0 if matched == len(rows) and rows else 1


def transfer_figures(rows: list[dict]) -> dict:
    """The first request's transfer alone (it meets its peers), percentiles over the rest."""
    times = [r["transfer_ms"] for r in rows]
    rest = sorted(times[1:]) or times
    return {"first_transfer_ms": times[0] if times else 0.0,
            "transfer_ms_p50": percentile(rest, 50), "transfer_ms_p99": percentile(rest, 99)}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def reference_tokens(args: argparse.Namespace, prompts: list[str]) -> list[list[int]]:
    """Greedy tokens of the same model in this process at TP 1: the oracle."""
    from kvxfer.engine.config import CacheConfig, EngineConfig, load_model_config, preset
    from kvxfer.engine.engine import Engine
    from kvxfer.engine.tokenizer import byte_level_tokenizer

    model = load_model_config(args.model) if args.model else preset(args.preset)
    engine = Engine(EngineConfig(model=model, cache=CacheConfig(num_blocks=64), seed=args.seed,
                                 model_dir=str(args.model) if args.model else None,
                                 device=args.device, dtype=args.dtype))
    tokenizer = engine.tokenizer or byte_level_tokenizer(model.vocab_size)
    return [engine.generate(tokenizer.encode(p).ids, args.max_tokens).tokens for p in prompts]


def ask(client: httpx.Client, url: str, prompt: str, want: list[int], max_tokens: int) -> dict:
    reply = client.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens})
    body = reply.json()
    if reply.status_code != 200:
        log.error("request failed: HTTP %d %s", reply.status_code, body)
        return {"prompt": prompt, "tokens": 0, "match": False, "path": "-", "bytes": 0, "descriptors": 0,
                "transfer_ms": 0.0, "gbps": 0.0, "error": body}
    got = body["choices"][0]["token_ids"]
    stats = body.get("kvxfer") or {}
    path = f"{stats.get('path', 'direct')} {stats.get('mode', '')}".strip()
    return {"prompt": prompt, "tokens": len(got), "match": got == want, "path": path, "bytes": stats.get("bytes", 0),
            "descriptors": stats.get("descriptors", 0), "transfer_ms": stats.get("transfer_ms", 0.0),
            "gbps": stats.get("gbps", 0.0)}


class Progress:
    """The demo's steps as a rich progress bar on stderr. While it shows, log records go through
    its console and print above the bar instead of into its line; `done` puts logging back."""

    def __init__(self, total: int) -> None:
        self.console = Console(stderr=True)
        self._bar = rich.progress.Progress(
            BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=self.console)  # the words last: they may be cut
        self._task = self._bar.add_task("", total=total)
        self._num_steps = 0
        root = logging.getLogger()
        self._handlers = root.handlers[:]
        root.handlers = [RichHandler(console=self.console, show_path=False, log_time_format="%H:%M:%S")]
        self._bar.start()

    def step(self, what: str) -> None:
        """Step `what` begins; the one before it is complete."""
        self._bar.update(self._task, completed=self._num_steps, description=what[:70])
        self._num_steps += 1

    def done(self) -> None:
        self._bar.update(self._task, completed=self._num_steps, description="done")
        self._bar.stop()
        logging.getLogger().handlers = self._handlers
