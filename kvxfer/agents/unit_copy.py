"""The GPU side of a staged transfer: one kernel that copies a request's units between every
layer of a cache and a staging buffer, in either direction, replayed as a CUDA graph.

- **Why not torch.** `index_select`/`index_copy_` need one launch per layer and run well below
  the device-copy rate on 16 KiB rows.
- **Why a graph.** On a 2 ms transfer the host's share matters. Building unit offsets in numpy,
  uploading them and launching through Triton's Python launcher cost 0.3 ms before the kernel
  starts on the H200 machine's host.
- **What a copier keeps.** A `UnitCopier` is built once per pairing (like the prepared
  descriptor lists). It keeps on the device what does not depend on the request
  (`planning.unit_terms`, for the largest request). A request only validates its block ids and
  where its parts start in the buffer, writes them into a pinned buffer and replays the graph.
  So one copier serves every slot of a pool.
- **Why the upload is a node of the graph**, not a torch copy of its own:
  - on a host that idled before the request, each torch call costs tens of microseconds
    (measured on the H200 machine: 0.2 ms for a request's load, 0.1 ms of it in the stream
    lookup and the copy);
  - a receiver's own upload would land while the sender's gather runs: on one GPU, a switch of
    context in the middle of the gather.
- **Several pairings, one copier.** Head slices of one cache for several decode ranks differ
  only in their heads (`can_share`). A prefill rank gathers them all with one validation, one
  upload and one kernel; a decode rank scatters its sources' parts the same way. At decode TP 2
  on one H200 that takes the second part's host work (0.1-0.2 ms on an idle host) off the path
  to the WRITEs.

Triton compiles the kernel when the first copier is built (about a second; cached on disk
afterwards, `kvxfer warmup` fills that cache ahead; kvxfer.kernels logs and counts each), and
`warm` captures its graph: both before a service is ready, so no request pays for them.
Without CUDA and Triton, staging uses `staging.Gather` (torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from kvxfer.errors import ConfigError
from kvxfer.kernels import watch_triton
from kvxfer.planning import PairPlan, request_block_ids, unit_terms

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton
    triton = None

_MAX_BLOCK = 4096  # elements per program: 16 KiB of int32
_ELEMENT = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    # Only the constexprs and the pointers' alignment pick a binary, not the sizes: a copier
    # built by `kvxfer warmup` on small caches compiles the kernels a service's copiers load.
    @triton.jit(do_not_specialize=["block_stride", "first_layer", "max_units", "num_parts"])
    def _copy_units(cache, buffer, layer_starts, which, within, request, block_stride, first_layer, max_units,
                    num_parts, UNIT: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, TO_SLOT: tl.constexpr):
        # program (unit chunk, layer, part); offsets in elements;
        # request = [num_units, each part's start in the buffer, block ids...]
        chunks: tl.constexpr = UNIT // BLOCK
        pid = tl.program_id(0)
        layer = tl.program_id(1).to(tl.int64)
        part = tl.program_id(2).to(tl.int64)
        unit = pid // chunks
        chunk = (pid % chunks).to(tl.int64)
        num_units = tl.load(request)
        block = tl.load(request + 1 + num_parts + tl.load(which + unit))
        in_cache = (tl.load(layer_starts + layer) + block * block_stride + tl.load(within + part * max_units + unit)
                    + chunk * BLOCK)
        in_slot = tl.load(request + 1 + part) + ((first_layer + layer) * num_units + unit) * UNIT + chunk * BLOCK
        in_cache = tl.multiple_of(in_cache, VEC)
        in_slot = tl.multiple_of(in_slot, VEC)
        i = tl.arange(0, BLOCK)
        live = (i < BLOCK) & (unit < num_units)  # the graph covers the largest request
        if TO_SLOT:
            tl.store(buffer + in_slot + i, tl.load(cache + in_cache + i, mask=live), mask=live)
        else:
            tl.store(cache + in_cache + i, tl.load(buffer + in_slot + i, mask=live), mask=live)


def can_share(plans: Sequence[PairPlan], side: int, max_tokens: int) -> bool:
    """Whether one copier (one kernel, one upload of the ids) can serve all these pairings of
    one side's cache: the same units per request, of the same size, in the same blocks; only
    their offsets inside a block (their heads) differ. True for the head slices one prefill rank
    sends to several decode ranks."""
    first = plans[0]
    desc = (first.local, first.remote)[side].desc
    if any((p.local, p.remote)[side].desc != desc or (p.chunk_tokens, p.unit_bytes, p.spans_per_chunk)
           != (first.chunk_tokens, first.unit_bytes, first.spans_per_chunk) for p in plans[1:]):
        return False
    stride = -(-max_tokens // desc.block_size)
    which = unit_terms(first, side, max_tokens, id_row_stride=stride)[0]
    return all(np.array_equal(unit_terms(p, side, max_tokens, id_row_stride=stride)[0], which) for p in plans[1:])


class UnitCopier:
    """Copies one side's units of a request (`side` as in `planning.layer_offsets`) between
    `layers` and a staging `buffer`, one part per pairing in `plans`: gathers into the buffer
    (`to_slot`) or scatters from it. A part holds layer after layer, the request's units in
    order, like `staging.Gather`; where each part starts in the buffer is the request's to say
    (any slot of a pool, any offset in it). Several pairings (see `can_share`) share one kernel
    and one upload of the ids.

    `load` a request's block ids and part offsets, then `run` any range of layers (one graph per
    range, captured on first use); the first `run` after a `load` uploads them. `load` waits for
    the previous request's upload, so `run` that one first."""

    def __init__(self, plans: Sequence[PairPlan], side: int, layers: list[torch.Tensor], buffer: torch.Tensor, *,
                 max_tokens: int, to_slot: bool) -> None:
        device = buffer.device
        if not available(device):
            raise ConfigError(f"unit copier: needs CUDA and Triton (device={device})")
        if not can_share(plans, side, max_tokens):
            raise ConfigError(f"unit copier: these {len(plans)} pairings differ in more than their heads; "
                              "give each its own copier")
        plan = plans[0]
        desc = (plan.local, plan.remote)[side].desc
        self.desc, self.plan, self.side, self.to_slot = desc, plan, side, to_slot
        self.layers, self.buffer, self.num_parts = layers, buffer, len(plans)
        self.max_blocks = -(-max_tokens // desc.block_size)
        rows = 2 if desc.separate_kv_pages else 1
        terms = [unit_terms(p, side, max_tokens, id_row_stride=self.max_blocks) for p in plans]
        which, within = terms[0][0], np.concatenate([w for _, w in terms])
        self.max_units = which.size
        if buffer.numel() < self.max_units * plan.unit_bytes * len(layers):
            raise ConfigError(f"unit copier: buffer of {buffer.numel()} bytes < {len(layers)} layers x "
                              f"{self.max_units} units x {plan.unit_bytes} bytes")
        addrs = np.array([t.data_ptr() for t in layers], dtype=np.int64)
        self.align = math.gcd(16, plan.unit_bytes, desc.block_stride, int(np.gcd.reduce(within)),
                              int(np.gcd.reduce(addrs - addrs[0])), int(addrs[0]), buffer.data_ptr())
        self.element = 4 if self.align % 4 == 0 else 2 if self.align % 2 == 0 else 1
        self.vec = self.align // self.element
        self._layer_starts = torch.from_numpy((addrs - addrs[0]) // self.element).to(device)
        # the buffer as elements (a whole number of them: a pool's size need not be a multiple)
        self._elements = buffer[: buffer.numel() - buffer.numel() % self.element].view(_ELEMENT[self.element])
        self._which = torch.from_numpy(which.astype(np.int32)).to(device)
        self._within = torch.from_numpy(within // self.element).to(device)
        # [num_units, part starts, block ids as rows x max_blocks]: one upload per request
        self._host = torch.zeros(1 + self.num_parts + rows * self.max_blocks, dtype=torch.int64).pin_memory()
        self._host_np = self._host.numpy()  # numpy views: no torch call per request
        self._host_ids = self._host_np[1 + self.num_parts :].reshape(rows, self.max_blocks)
        self._request = torch.zeros_like(self._host, device=device)
        self._uploaded = torch.cuda.Event()
        self._upload_pending = False
        self._graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        watch_triton()
        with torch.cuda.device(device):  # Triton launches on the current device
            self._launch(range(len(layers)))  # compile now (0 units: nothing moves), not in a request

    def warm(self) -> None:
        """Capture the graph a request replays (an empty request: nothing moves), so that the
        first real one only replays it."""
        rows = self._host_ids.shape[0]
        self.stage(np.zeros((rows, 0), dtype=np.int64), 0, [0] * self.num_parts)
        self.run()
        self._uploaded.synchronize()

    def part_bytes(self, num_tokens: int) -> int:
        """Bytes of one part of a `num_tokens` request (every layer)."""
        return self.plan.units_per_layer(num_tokens) * self.plan.unit_bytes * len(self.layers)

    def fits(self, num_tokens: int) -> bool:
        """Whether a `num_tokens` request is within what this copier was built for."""
        return self.plan.units_per_layer(num_tokens) <= self.max_units and \
            -(-num_tokens // self.desc.block_size) <= self.max_blocks

    def check(self, block_ids: np.ndarray, num_tokens: int) -> np.ndarray:
        """One request's block ids, validated (refusing out-of-range, repeated or miscounted
        ids: the kernel trusts them), as `stage` takes them."""
        if not self.fits(num_tokens):
            raise ConfigError(f"unit copier: num_tokens={num_tokens} is more than it was built for "
                              f"({self.max_units} units, {self.max_blocks} blocks)")
        return request_block_ids(self.desc, block_ids, num_tokens, who=("local", "remote")[self.side])

    def load(self, block_ids: np.ndarray, num_tokens: int, offsets: Sequence[int]) -> int:
        """`check` then `stage`. Returns the bytes per layer it moves for each part."""
        return self.stage(self.check(block_ids, num_tokens), num_tokens, offsets)

    def stage(self, ids: np.ndarray, num_tokens: int, offsets: Sequence[int]) -> int:
        """Stage checked ids and where the request's parts start in the buffer (in bytes, one
        per pairing: refusing any that reaches outside it or breaks the copy's alignment) for
        the next `run` to upload. Returns the bytes per layer it moves for each part."""
        size = self.part_bytes(num_tokens)
        if len(offsets) != self.num_parts or any(
                o < 0 or o + size > self._elements.numel() * self.element or o % self.align for o in offsets):
            raise ConfigError(f"unit copier: part offsets {list(offsets)} for {self.num_parts} part(s) of {size} "
                              f"bytes in a buffer of {self._elements.numel() * self.element} (multiples of "
                              f"{self.align})")
        # the previous upload has left the pinned buffer (ids loaded but never run are replaced)
        self._uploaded.synchronize()
        num_units = self.plan.units_per_layer(num_tokens)
        self._host_np[0] = num_units
        self._host_np[1 : 1 + self.num_parts] = np.asarray(offsets, dtype=np.int64) // self.element
        self._host_ids[:, : ids.shape[1]] = ids
        self._upload_pending = True
        return num_units * self.plan.unit_bytes

    def run(self, layers: range | None = None) -> None:
        """Copy the loaded request's units of `layers` (default all), on the current stream;
        the first run after a `load` uploads its ids first."""
        layers = range(len(self.layers)) if layers is None else layers
        upload = self._upload_pending
        key = (layers.start, layers.stop, upload)
        with torch.cuda.device(self.buffer.device):  # the graph runs on its own device's stream
            graph = self._graphs.get(key)
            if graph is None:  # first use: run eagerly (Triton compiles outside a capture), capture for next time
                self._steps(layers, upload)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self._steps(layers, upload)
                self._graphs[key] = graph
            else:
                graph.replay()
            if upload:
                self._uploaded.record()
                self._upload_pending = False

    def _steps(self, layers: range, upload: bool) -> None:
        if upload:
            self._request.copy_(self._host, non_blocking=True)
        self._launch(layers)

    def _launch(self, layers: range) -> None:
        dtype = _ELEMENT[self.element]
        unit = self.plan.unit_bytes // self.element
        block = math.gcd(unit, _MAX_BLOCK)  # a power of two dividing the unit
        grid = (self.max_units * (unit // block), len(layers), self.num_parts)
        # layer starts are relative to the first layer, so every range shares one base pointer
        _copy_units[grid](self.layers[0].view(torch.uint8).view(dtype), self._elements,
                          self._layer_starts[layers.start :], self._which, self._within, self._request,
                          self.desc.block_stride // self.element, layers.start, self.max_units, self.num_parts,
                          UNIT=unit, BLOCK=block, VEC=self.vec, TO_SLOT=self.to_slot,
                          num_warps=8 if block >= 2048 else 4)
