#!/usr/bin/env python3
"""GPU check of kvxfer's attention and reference engine (run on a CUDA machine with FlashInfer).

What it prints, one line per check, then a summary (exit status 1 if any check failed):
  1. kernels: FlashInfer vs the torch path (fp32 reference over the same bf16 cache), relative
     error for decode and prefill, per layout; layouts without a FlashInfer kernel show the fallback.
  2. warmup CLI: `kvxfer warmup` into a fresh FlashInfer cache directory compiles the kernels;
     a second run compiles nothing (what a container image carries).
  3. engine: the `small-gpu` model on CUDA. fp32 (torch attention: FlashInfer has no fp32 kernel)
     gives the CPU fp32 tokens exactly; bf16 with FlashInfer after `Engine.warmup()`: the first
     request compiles nothing, and where its tokens first differ from bf16 torch attention and from
     fp32 is reported (bf16 may drift after several tokens; not a failure).

Run from the repository root on the GPU machine (python 3.12, torch with CUDA, flashinfer 0.6.x):
    ../shared/device/make-wheelhouse.sh      # here; also put a cp312 msgspec wheel into .whl/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD
    python3 scripts/gpu_check_attention.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BF16_TOLERANCE = 2e-2  # relative error; NOTES.md saw 2.3e-3 for FlashInfer decode in bf16
RESULTS: list[tuple[str, bool, str]] = []


def record(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def guarded(name: str):
    """Run a check; an exception is a failed check with its message, not a crash."""
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # report every check, whatever breaks
                logging.exception("%s raised", name)
                record(name, False, f"{type(err).__name__}: {err}")
        return run
    return wrap


# ---- 1. FlashInfer vs torch over the same cache ------------------------------------------------


def random_case(layout: str, q_len: int, torch, attention):
    """A bf16 cache of random pages and a batch of 4 requests with distinct, shuffled pages."""
    from kvxfer.layouts import Geometry, get_layout

    hq, hkv, d, bs, pages = 32, 8, 128, 16, 256
    spec = get_layout(layout)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(spec.shape(Geometry(pages, bs, hkv, d)), generator=gen, device="cuda",
                        dtype=torch.float32).to(torch.bfloat16)
    kv_lens = [17, 100, 33, 260] if q_len == 1 else [40, 130, 64, 300]
    q_lens = [1] * 4 if q_len == 1 else [40, 30, 1, 77]  # prefill with and without a cached prefix
    perm, start, blocks = torch.randperm(pages, generator=torch.Generator().manual_seed(0)), 0, []
    for n in kv_lens:
        need = -(-n // bs) * (2 if spec.separate_kv_pages else 1)
        ids = perm[start : start + need]
        blocks.append(ids.reshape(2, -1) if spec.separate_kv_pages else ids)
        start += need
    table = attention.PageTable.build(blocks, [k - q for k, q in zip(kv_lens, q_lens, strict=True)], q_lens,
                                      block_size=bs, separate_kv_pages=spec.separate_kv_pages,
                                      device="cuda")
    q = torch.randn(sum(q_lens), hq, d, generator=gen, device="cuda").to(torch.bfloat16)
    return cache, table, q, (hq, hkv, d, bs)


def check_kernels(torch, attention) -> None:
    for layout in ("flashinfer-hnd", "flashinfer-nhd", "flash-attn-hnd", "flash-attn-nhd",
                   "packed", "trtllm-hnd"):
        for kind, q_len in (("decode", 1), ("prefill", 8)):
            guarded(f"kernel {kind} {layout}")(check_kernel)(torch, attention, layout, kind, q_len)


def check_kernel(torch, attention, layout: str, kind: str, q_len: int) -> None:
    name = f"kernel {kind} {layout}"
    cache, table, q, (hq, hkv, d, bs) = random_case(layout, q_len, torch, attention)
    gap = attention.flashinfer_gap(layout, torch.bfloat16, d, torch.device("cuda"))
    if gap is not None:
        attn = attention.PagedAttention(layout=layout, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                                        block_size=bs, dtype=torch.bfloat16, device="cuda")
        record(name, attn.backend == "torch", f"no FlashInfer kernel, torch fallback ({gap})")
        return
    attn = attention.PagedAttention(layout=layout, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                                    block_size=bs, dtype=torch.bfloat16, device="cuda",
                                    backend="flashinfer")
    attn.plan(table)
    start = time.perf_counter()
    out = attn.run(q, cache).float()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ref = attention.torch_attention(q.float(), layout, cache.float(), table, scale=d**-0.5)
    rel = float((out - ref).norm() / ref.norm())
    record(name, rel < BF16_TOLERANCE,
           f"bf16 relative error {rel:.2e} (fp32 torch reference; first run {seconds:.2f} s)")


# ---- 2. the warmup command into a fresh cache directory ---------------------------------------


@guarded("warmup CLI")
def check_warmup_cli(cache_dir: Path) -> None:
    cmd = [sys.executable, "-m", "kvxfer.cli", "warmup", "--model", "small-gpu", "--tp", "1", "2", "4",
           "--layout", "flashinfer-hnd", "flashinfer-nhd", "--cache-dir", str(cache_dir)]
    first = _run(cmd)
    second = _run(cmd)
    compiled_first = _compile_lines(first)
    compiled_second = _compile_lines(second)
    summary = next((line for line in second.splitlines() if "libraries compiled" in line), "")
    record("warmup CLI", bool(compiled_first) and not compiled_second,
           f"first run compiled {len(compiled_first)} kernel(s), second run {len(compiled_second)}; "
           f"{summary.split(': ', 1)[-1]}")
    print("\n".join("    " + line for line in compiled_first), flush=True)


def _compile_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "warmup: flashinfer kernel" in line and " compiled " in line]


def _run(cmd: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stderr + proc.stdout


# ---- 3. the engine on CUDA --------------------------------------------------------------------


def engine_run(torch, *, device: str, dtype: str, backend: str, warm: bool = False):
    from kvxfer import attention
    from kvxfer.engine import CacheConfig, Engine, EngineConfig, preset

    config = EngineConfig(model=preset("small-gpu"), device=device, dtype=dtype, seed=0,
                          attention_backend=backend,
                          cache=CacheConfig(layout="flashinfer-hnd", block_size=16, num_blocks=64))
    engine = Engine(config)
    prompt = torch.randint(0, config.model.vocab_size, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    if warm:
        engine.warmup()
    before, start = attention.jit_libraries(), time.perf_counter()
    out = engine.generate(prompt, 24)
    seconds = time.perf_counter() - start
    return out.tokens, attention.jit_libraries() - before, seconds, engine.attention.backend


def first_difference(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first differs at generated token {i}"
    return "identical"


@guarded("engine")
def check_engine(torch) -> None:
    cpu, _, _, _ = engine_run(torch, device="cpu", dtype="float32", backend="torch")
    cuda32, _, _, backend32 = engine_run(torch, device="cuda", dtype="float32", backend="auto")
    record("engine fp32 cuda == cpu", cuda32 == cpu,
           f"{len(cpu)} greedy tokens, attention={backend32} (FlashInfer has no fp32 kernel); "
           f"{first_difference(cuda32, cpu)}")
    fi, compiled, seconds, backend = engine_run(torch, device="cuda", dtype="bfloat16",
                                                backend="flashinfer", warm=True)
    record("engine first request after warmup", backend == "flashinfer" and not compiled,
           f"attention={backend}, compiled {sorted(compiled) or 'nothing'}, {seconds:.2f} s for 24 tokens")
    ref16, _, _, _ = engine_run(torch, device="cuda", dtype="bfloat16", backend="torch")
    record("engine bf16 flashinfer vs torch", True,
           f"{first_difference(fi, ref16)}; vs fp32: {first_difference(fi, cpu)} (reported, not asserted)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None,
                        help="FlashInfer workspace base for this run (default: a fresh temporary one)")
    args = parser.parse_args()
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="kvxfer-flashinfer-"))
    # The warmup CLI check fills <cache_dir>/cli; this process compiles into <cache_dir>/self.
    os.environ["FLASHINFER_WORKSPACE_BASE"] = str(cache_dir / "self")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(ROOT))
    import torch

    from kvxfer import attention

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here", file=sys.stderr)
        return 2
    import flashinfer

    print(f"torch {torch.__version__}, flashinfer {flashinfer.__version__}, "
          f"{torch.cuda.get_device_name()}, cache {cache_dir}", flush=True)
    check_kernels(torch, attention)
    check_warmup_cli(cache_dir / "cli")
    check_engine(torch)
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
