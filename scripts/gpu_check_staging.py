#!/usr/bin/env python3
"""GPU check of the staged path's gather and scatter (one process, one GPU, no NIXL).

For the Llama-3-8B-shaped request (32 layers of a FlashInfer HND cache `[N, 2, 8, 16, 128]`
bf16, 512 random blocks = 8192 tokens), both unit shapes a staged transfer copies:
  - same TP: one 64 KiB unit per block and layer (K and V fused), 1 GiB;
  - decode TP 2: one 16 KiB unit per block, K/V and layer for heads 0-3, 512 MiB.
For each it times (CUDA events, median of --iters) a device copy of the same bytes, the torch
path (`staging.Gather`: index_select / index_copy_ per layer) and the unit copier (one kernel
for all layers, replayed as a CUDA graph), checks that the copier's slot and scattered cache
equal the torch path's byte for byte and hold the source's units, that a later request with
other ids copied in two layer groups does too, that one copier gathering every decode rank's
slice at TP 2 does too, and reports the host's cost of one request
around the copier. Exit status 1 if any check fails.

Run from the repository root on the GPU machine (see scripts/gpu_check_attention.py for the
wheel install):  python3 scripts/gpu_check_staging.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from kvxfer.agents.staging import Gather
from kvxfer.agents.unit_copy import UnitCopier
from kvxfer.layouts import CacheRegion, describe
from kvxfer.planning import layer_offsets, map_tp, pair

LAYERS, HEADS, BLOCK, DIM, BLOCKS = 32, 8, 16, 128, 512
POOL, TOKENS = BLOCKS * 5 // 4, BLOCKS * BLOCK


def timed(fn, iters: int) -> float:
    """Median milliseconds of `fn` on the current stream."""
    fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def region_of(layers: list[torch.Tensor], heads: int, first_head: int = 0) -> CacheRegion:
    d = describe("flashinfer-hnd", num_layers=LAYERS, num_blocks=POOL, block_size=BLOCK, num_heads=heads,
                 head_dim=DIM, dtype="bfloat16", first_head=first_head, total_heads=HEADS)
    return CacheRegion(d, np.array([t.data_ptr() for t in layers], dtype=np.uint64), 0)


def check(decode_tp: int, iters: int, device: torch.device) -> bool:
    """Decode rank 0's share of the request at this decode TP, gathered on the prefill side
    and scattered into a decode-shaped cache, by torch and by the unit copier."""
    gen = torch.Generator().manual_seed(decode_tp)
    ids = torch.randperm(POOL, generator=gen)[:BLOCKS].numpy().astype(np.int64)
    heads = HEADS // decode_tp
    src = [torch.randint(-2**15, 2**15, (POOL, 2, HEADS, BLOCK, DIM), dtype=torch.int16, device=device)
           .view(torch.bfloat16) for _ in range(LAYERS)]
    plan = pair(region_of(src, HEADS), region_of(src, heads), map_tp(HEADS, 1, decode_tp).assignments[0].heads)
    offsets = layer_offsets(plan, 0, ids, TOKENS)
    torch_path = Gather.build(offsets, plan.unit_bytes, src[0].nbytes, device)
    nbytes = torch_path.bytes_per_layer * LAYERS
    slot_torch = torch.empty(nbytes, dtype=torch.uint8, device=device)
    slot_kernel = torch.empty_like(slot_torch)
    gather = UnitCopier([plan], 0, src, slot_kernel, max_tokens=TOKENS, to_slot=True)
    gather.load(ids, TOKENS, [0])
    copy_src = torch.empty_like(slot_torch)

    copy_ms = timed(lambda: slot_kernel.copy_(copy_src), iters)
    gather_torch = timed(lambda: torch_path.gather(src, slot_torch), iters)
    gather_kernel = timed(gather.run, iters)
    gathered_equal = torch.equal(slot_kernel, slot_torch)

    # scatter back into caches shaped like the source (same plan side, fresh zeros)
    dst_torch = [torch.zeros_like(t) for t in src]
    dst_kernel = [torch.zeros_like(t) for t in src]
    scatter = UnitCopier([plan], 0, dst_kernel, slot_kernel, max_tokens=TOKENS, to_slot=False)
    scatter.load(ids, TOKENS, [0])
    scatter_torch = timed(lambda: torch_path.scatter(slot_torch, dst_torch), iters)
    scatter_kernel = timed(scatter.run, iters)
    scattered_equal = all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                          for a, b in zip(dst_kernel, dst_torch, strict=True))
    # and what came back is exactly the source's units (checked by bytes on two layers)
    round_trip = all(torch.equal(d.view(torch.uint8).reshape(-1)[o : o + plan.unit_bytes],
                                 s_.view(torch.uint8).reshape(-1)[o : o + plan.unit_bytes])
                     for d, s_ in zip(dst_kernel[:2], src[:2], strict=True) for o in offsets.tolist())

    def gbps(ms: float) -> float:
        return nbytes / ms / 1e6

    print(f"decode TP {decode_tp}, rank 0: {nbytes / 2**20:.0f} MiB, {offsets.size} units of "
          f"{plan.unit_bytes // 1024} KiB per layer")
    print(f"  device copy        {copy_ms:7.3f} ms  {gbps(copy_ms):7.0f} GB/s")
    print(f"  gather  torch      {gather_torch:7.3f} ms  {gbps(gather_torch):7.0f} GB/s")
    print(f"  gather  copier     {gather_kernel:7.3f} ms  {gbps(gather_kernel):7.0f} GB/s   equal to torch: {gathered_equal}")
    print(f"  scatter torch      {scatter_torch:7.3f} ms  {gbps(scatter_torch):7.0f} GB/s")
    print(f"  scatter copier     {scatter_kernel:7.3f} ms  {gbps(scatter_kernel):7.0f} GB/s   equal to torch: "
          f"{scattered_equal}, round trip: {round_trip}")
    host_costs(gather, ids)
    next_equal = next_request(plan, src, gather, scatter, dst_kernel, gen, device)
    print(f"  next request (fewer tokens, other ids, two layer groups): equal to torch: {next_equal}")
    shared_equal = shared_gather(src, ids, decode_tp, iters, device) if decode_tp > 1 else True
    return gathered_equal and scattered_equal and round_trip and next_equal and shared_equal


def shared_gather(src: list[torch.Tensor], ids: np.ndarray, decode_tp: int, iters: int, device: torch.device) -> bool:
    """Every decode rank's slice gathered by one copier into its own part of one staging buffer
    (what a prefill rank does for decode ranks on its own GPU): each part equals the torch path's."""
    heads = HEADS // decode_tp
    plans = [pair(region_of(src, HEADS), region_of(src, heads, a.heads.start), a.heads)
             for a in map_tp(HEADS, 1, decode_tp).assignments]
    paths = [Gather.build(layer_offsets(p, 0, ids, TOKENS), p.unit_bytes, src[0].nbytes, device) for p in plans]
    nbytes = paths[0].bytes_per_layer * LAYERS
    staging = torch.empty(nbytes * len(plans), dtype=torch.uint8, device=device)
    slots = [staging[i * nbytes : (i + 1) * nbytes] for i in range(len(plans))]
    copier = UnitCopier(plans, 0, src, staging, max_tokens=TOKENS, to_slot=True)
    copier.load(ids, TOKENS, [i * nbytes for i in range(len(plans))])
    ms = timed(copier.run, iters)
    equal = True
    for path, slot in zip(paths, slots, strict=True):
        expected = torch.empty_like(slot)
        path.gather(src, expected)
        equal = equal and torch.equal(slot, expected)
    print(f"  gather, {len(plans)} ranks' slices by one copier: {ms:.3f} ms "
          f"({nbytes * len(plans) / ms / 1e6:.0f} GB/s)   equal to torch: {equal}")
    return equal


def next_request(plan, src: list[torch.Tensor], gather: UnitCopier, scatter: UnitCopier,
                 dst: list[torch.Tensor], gen: torch.Generator, device: torch.device) -> bool:
    """A later, shorter request with other block ids, copied in two layer groups: the
    graphs captured for the first request must upload and use the new ids (once, with the
    first group), and the copy must equal the torch path's for those ids."""
    ids = torch.randperm(POOL, generator=gen)[:BLOCKS - 3].numpy().astype(np.int64)
    tokens = (BLOCKS - 3) * BLOCK - 5
    torch_path = Gather.build(layer_offsets(plan, 0, ids, tokens), plan.unit_bytes, src[0].nbytes, device)
    nbytes = torch_path.bytes_per_layer * LAYERS
    slot_torch = torch.empty(nbytes, dtype=torch.uint8, device=device)
    torch_path.gather(src, slot_torch)
    halves = (range(0, LAYERS // 2), range(LAYERS // 2, LAYERS))
    gather.load(ids, tokens, [0])
    for layers in halves:
        gather.run(layers)
    gathered = torch.equal(gather.buffer[:nbytes], slot_torch)
    dst_torch = [t.clone() for t in dst]
    torch_path.scatter(slot_torch, dst_torch)
    scatter.load(ids, tokens, [0])
    for layers in halves:
        scatter.run(layers)
    scattered = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(dst, dst_torch, strict=True))
    return gathered and scattered


def host_costs(copier: UnitCopier, ids: np.ndarray) -> None:
    """What one request costs the host around the copier (median us, after an idle gap like a
    request arriving): validating and uploading the ids, replaying the graph, the whole gather."""
    steps: dict[str, list[float]] = {"load": [], "replay": [], "kernel wait": []}
    for _ in range(30):
        time.sleep(0.005)
        t0 = time.perf_counter()
        copier.load(ids, TOKENS, [0])
        t1 = time.perf_counter()
        copier.run()
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            steps[k].append(v * 1e6)
    print("  host, median us:  " + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in steps.items())
          + f", total {sum(statistics.median(v) for v in steps.values()):.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20, help="timed runs per measurement (median)")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device), "torch", torch.__version__)
    ok = check(1, args.iters, device)
    ok = check(2, args.iters, device) and ok
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
