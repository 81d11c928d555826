"""The GPU side of a staged transfer: one kernel that copies a request's units between every
layer of a cache and a contiguous staging part, in either direction, replayed as a CUDA graph.

Why not torch: `index_select`/`index_copy_` need one launch per layer and run well below the
device-copy rate on 16 KiB rows. Why a graph: on a 2 ms transfer the host's share matters, and
building unit offsets in numpy, uploading them and launching through Triton's Python launcher
cost 0.3 ms before the kernel starts on the H200 machine's host. So a `UnitCopier` is built once
per peer (like the prepared descriptor lists): it keeps what does not depend on the block ids
(`planning.unit_terms`, for the largest request) on the device, and a request only validates
its ids, copies them into a pinned buffer and replays the graph, which uploads them before the
kernel looks them up. The upload is a node of the graph, not a torch copy of its own, because
on a host that idled before the request each torch call costs tens of microseconds (measured
on the H200 machine: 0.2 ms for a request's load, 0.1 ms of it in the stream lookup and the
copy), and a receiver's upload then lands while the sender's gather runs (on one GPU, a switch
of context in the middle of the gather).

A prefill rank that sends head slices to several decode ranks on its own GPU gathers them all
with one copier: the parts differ only in their heads, so one validation and one upload of the
ids serve all of them, and one kernel fills every slot. At decode TP 2 on one H200 that takes
the second part's host work (0.1-0.2 ms on an idle host) off the path to the WRITEs.

Triton compiles the kernel when the first copier is built (about a second; cached on disk
afterwards). Without CUDA and Triton, staging uses `staging.Gather` (torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from kvxfer.errors import ConfigError
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

    @triton.jit
    def _copy_units(cache, slot, layer_starts, which, within, slot_starts, request, block_stride, first_layer,
                    max_units, UNIT: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, TO_SLOT: tl.constexpr):
        # program (unit chunk, layer, part); offsets in elements; request = [num_units, block ids...]
        chunks: tl.constexpr = UNIT // BLOCK
        pid = tl.program_id(0)
        layer = tl.program_id(1).to(tl.int64)
        part = tl.program_id(2).to(tl.int64)
        unit = pid // chunks
        chunk = (pid % chunks).to(tl.int64)
        num_units = tl.load(request)
        block = tl.load(request + 1 + tl.load(which + unit))
        in_cache = (tl.load(layer_starts + layer) + block * block_stride + tl.load(within + part * max_units + unit)
                    + chunk * BLOCK)
        in_slot = tl.load(slot_starts + part) + ((first_layer + layer) * num_units + unit) * UNIT + chunk * BLOCK
        in_cache = tl.multiple_of(in_cache, VEC)
        in_slot = tl.multiple_of(in_slot, VEC)
        i = tl.arange(0, BLOCK)
        live = (i < BLOCK) & (unit < num_units)  # the graph covers the largest request
        if TO_SLOT:
            tl.store(slot + in_slot + i, tl.load(cache + in_cache + i, mask=live), mask=live)
        else:
            tl.store(cache + in_cache + i, tl.load(slot + in_slot + i, mask=live), mask=live)


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
    """Copies one side's units of a request between `layers` and one slot per pairing (`parts`:
    (plan, slot), with `side` as in `planning.layer_offsets`): gathers into the slots
    (`to_slot`) or scatters from them. A slot holds layer after layer, the request's units in
    order, like `staging.Gather`. Several parts (see `can_share`) share one kernel and one
    upload of the request's ids.

    `load` a request's block ids, then `run` any range of layers (one graph per range, captured
    on first use); the first `run` after a `load` uploads the ids. `load` waits for the previous
    request's upload, so `run` that one first."""

    def __init__(self, parts: Sequence[tuple[PairPlan, torch.Tensor]], side: int, layers: list[torch.Tensor], *,
                 max_tokens: int, to_slot: bool) -> None:
        plans, slots = [p for p, _ in parts], [s for _, s in parts]
        device = slots[0].device
        if not available(device):
            raise ConfigError(f"unit copier: needs CUDA and Triton (device={device})")
        if not can_share(plans, side, max_tokens):
            raise ConfigError(f"unit copier: these {len(plans)} pairings differ in more than their heads; "
                              "give each its own copier")
        plan = plans[0]
        desc = (plan.local, plan.remote)[side].desc
        self.desc, self.plan, self.side, self.to_slot = desc, plan, side, to_slot
        self.layers, self.slots = layers, slots
        self.max_blocks = -(-max_tokens // desc.block_size)
        rows = 2 if desc.separate_kv_pages else 1
        terms = [unit_terms(p, side, max_tokens, id_row_stride=self.max_blocks) for p in plans]
        which, within = terms[0][0], np.concatenate([w for _, w in terms])
        self.max_units = which.size
        for slot in slots:
            if slot.numel() < self.max_units * plan.unit_bytes * len(layers):
                raise ConfigError(f"unit copier: slot of {slot.numel()} bytes < {len(layers)} layers x "
                                  f"{self.max_units} units x {plan.unit_bytes} bytes")
        addrs = np.array([t.data_ptr() for t in layers], dtype=np.int64)
        slot_addrs = np.array([t.data_ptr() for t in slots], dtype=np.int64)
        align = math.gcd(16, plan.unit_bytes, desc.block_stride, int(np.gcd.reduce(within)),
                         int(np.gcd.reduce(addrs - addrs[0])), int(addrs[0]), *(int(a) for a in slot_addrs))
        self.element = 4 if align % 4 == 0 else 2 if align % 2 == 0 else 1
        self.vec = align // self.element
        self._layer_starts = torch.from_numpy((addrs - addrs[0]) // self.element).to(device)
        # every slot addressed from the first one's pointer
        self._slot_starts = torch.from_numpy((slot_addrs - slot_addrs[0]) // self.element).to(device)
        self._which = torch.from_numpy(which.astype(np.int32)).to(device)
        self._within = torch.from_numpy(within // self.element).to(device)
        # [num_units, block ids as rows x max_blocks]: one upload per request
        self._host = torch.zeros(1 + rows * self.max_blocks, dtype=torch.int64).pin_memory()
        self._host_np = self._host.numpy()  # numpy views: no torch call per request
        self._host_ids = self._host_np[1:].reshape(rows, self.max_blocks)
        self._request = torch.zeros_like(self._host, device=device)
        self._uploaded = torch.cuda.Event()
        self._upload_pending = False
        self._graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.num_units = 0
        with torch.cuda.device(device):  # Triton launches on the current device
            self._launch(range(len(layers)))  # compile now (0 units: nothing moves), not in a request

    def load(self, block_ids: np.ndarray, num_tokens: int) -> int:
        """Validate one request's block ids (refusing out-of-range, repeated or miscounted ids:
        the kernel trusts them) and stage them for the next `run` to upload. Returns the bytes
        per layer it moves for each part."""
        if num_tokens > self.max_blocks * self.desc.block_size:
            raise ConfigError(f"unit copier: num_tokens={num_tokens} > the {self.max_blocks * self.desc.block_size} "
                              "it was built for")
        ids = request_block_ids(self.desc, block_ids, num_tokens, who=("local", "remote")[self.side])
        # the previous upload has left the pinned buffer (ids loaded but never run are replaced)
        self._uploaded.synchronize()
        self.num_units = self.plan.units_per_layer(num_tokens)
        self._host_np[0] = self.num_units
        self._host_ids[:, : ids.shape[1]] = ids
        self._upload_pending = True
        return self.num_units * self.plan.unit_bytes

    def run(self, layers: range | None = None) -> None:
        """Copy the loaded request's units of `layers` (default all), on the current stream;
        the first run after a `load` uploads its ids first."""
        layers = layers or range(len(self.layers))
        upload = self._upload_pending
        key = (layers.start, layers.stop, upload)
        with torch.cuda.device(self.slots[0].device):  # the graph runs on its own device's stream
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
        grid = (self.max_units * (unit // block), len(layers), len(self.slots))
        # layer starts are relative to the first layer, so every range shares one base pointer
        _copy_units[grid](self.layers[0].view(torch.uint8).view(dtype), self.slots[0].view(dtype),
                          self._layer_starts[layers.start :], self._which, self._within, self._slot_starts,
                          self._request, self.desc.block_stride // self.element, layers.start, self.max_units,
                          UNIT=unit, BLOCK=block, VEC=self.vec, TO_SLOT=self.to_slot,
                          num_warps=8 if block >= 2048 else 4)
