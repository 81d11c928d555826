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

Triton compiles the kernel when the first copier is built (about a second; cached on disk
afterwards). Without CUDA and Triton, staging uses `staging.Gather` (torch).
"""

from __future__ import annotations

import math

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
    def _copy_units(cache, slot, layer_starts, which, within, request, block_stride, first_layer,
                    UNIT: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, TO_SLOT: tl.constexpr):
        # program (unit chunk, layer); offsets in elements; request = [num_units, block ids...]
        chunks: tl.constexpr = UNIT // BLOCK
        pid = tl.program_id(0)
        layer = tl.program_id(1).to(tl.int64)
        unit = pid // chunks
        chunk = (pid % chunks).to(tl.int64)
        num_units = tl.load(request)
        block = tl.load(request + 1 + tl.load(which + unit))
        in_cache = tl.load(layer_starts + layer) + block * block_stride + tl.load(within + unit) + chunk * BLOCK
        in_slot = ((first_layer + layer) * num_units + unit) * UNIT + chunk * BLOCK
        in_cache = tl.multiple_of(in_cache, VEC)
        in_slot = tl.multiple_of(in_slot, VEC)
        i = tl.arange(0, BLOCK)
        live = (i < BLOCK) & (unit < num_units)  # the graph covers the largest request
        if TO_SLOT:
            tl.store(slot + in_slot + i, tl.load(cache + in_cache + i, mask=live), mask=live)
        else:
            tl.store(cache + in_cache + i, tl.load(slot + in_slot + i, mask=live), mask=live)


class UnitCopier:
    """Copies one side's units of a request (`plan`, `side` as in `planning.layer_offsets`)
    between `layers` and `slot`: gathers into the slot (`to_slot`) or scatters from it. The slot
    holds layer after layer, the request's units in order, like `staging.Gather`.

    `load` a request's block ids, then `run` any range of layers (one graph per range, captured
    on first use); the first `run` after a `load` uploads the ids. `load` waits for the previous
    request's upload, so `run` that one first."""

    def __init__(self, plan: PairPlan, side: int, layers: list[torch.Tensor], slot: torch.Tensor, *,
                 max_tokens: int, to_slot: bool) -> None:
        device = slot.device
        if not available(device):
            raise ConfigError(f"unit copier: needs CUDA and Triton (device={device})")
        desc = (plan.local, plan.remote)[side].desc
        self.desc, self.plan, self.side, self.to_slot = desc, plan, side, to_slot
        self.layers, self.slot = layers, slot
        self.max_blocks = -(-max_tokens // desc.block_size)
        rows = 2 if desc.separate_kv_pages else 1
        which, within = unit_terms(plan, side, max_tokens, id_row_stride=self.max_blocks)
        self.max_units = which.size
        if slot.numel() < self.max_units * plan.unit_bytes * len(layers):
            raise ConfigError(f"unit copier: slot of {slot.numel()} bytes < {len(layers)} layers x "
                              f"{self.max_units} units x {plan.unit_bytes} bytes")
        addrs = np.array([t.data_ptr() for t in layers], dtype=np.int64)
        align = math.gcd(16, plan.unit_bytes, desc.block_stride, int(np.gcd.reduce(within)),
                         int(np.gcd.reduce(addrs - addrs[0])), int(addrs[0]), slot.data_ptr())
        self.element = 4 if align % 4 == 0 else 2 if align % 2 == 0 else 1
        self.vec = align // self.element
        self._layer_starts = torch.from_numpy((addrs - addrs[0]) // self.element).to(device)
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
        per layer it moves."""
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
        with torch.cuda.device(self.slot.device):  # the graph runs on its own device's stream
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
        grid = (self.max_units * (unit // block), len(layers))
        # layer starts are relative to the first layer, so every range shares one base pointer
        _copy_units[grid](self.layers[0].view(torch.uint8).view(dtype), self.slot.view(dtype),
                          self._layer_starts[layers.start :], self._which, self._within, self._request, self.desc.block_stride // self.element,
                          layers.start, UNIT=unit, BLOCK=block, VEC=self.vec, TO_SLOT=self.to_slot,
                          num_warps=8 if block >= 2048 else 4)
