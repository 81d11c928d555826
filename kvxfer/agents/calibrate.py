"""Calibrate the cost model on the actual fabric: a few probe transfers between this rank's and a
peer's registered staging buffers, and a local copy, give the numbers `planning.cost` needs.

Probes (each repeated, median kept): one descriptor of `probe_bytes` (bulk bandwidth, READ and
WRITE), `num_small` descriptors of `small_bytes` (per-descriptor cost), one empty-ish transfer
(fixed cost), and a device copy of `probe_bytes` (gather/scatter bandwidth). Takes tens of
milliseconds; run it once per peer at handshake or at start-up, and log the result.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from kvxfer.agents.messages import MemoryKind
from kvxfer.agents.nixl_agent import NixlAgent, Op
from kvxfer.errors import ConfigError
from kvxfer.planning.cost import FabricCosts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """Where probes may write and read: `local` and `remote` are registered buffers of at least
    `probe_bytes` that hold nothing of value (staging slots)."""

    local_addr: int
    remote_addr: int
    local_device: int
    remote_device: int
    local_mem: MemoryKind
    remote_mem: MemoryKind
    peer: str


def _time(agent: NixlAgent, op: Op, probe: Probe, lengths: np.ndarray, *, repeats: int,
          timeout_s: float) -> float:
    # Gaps between spans, so that nothing can merge them: every descriptor pays its own cost.
    offsets = (np.arange(lengths.size, dtype=np.uint64) * 2 * lengths).astype(np.uint64)
    local = np.stack([probe.local_addr + offsets, lengths, np.full(lengths.size, probe.local_device)], axis=1)
    remote = np.stack([probe.remote_addr + offsets, lengths, np.full(lengths.size, probe.remote_device)], axis=1)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        xfer = agent.post_spans(op, local.astype(np.uint64), remote.astype(np.uint64), peer=probe.peer,
                                local_mem=probe.local_mem, remote_mem=probe.remote_mem, probe=True)
        agent.wait([xfer], timeout_s=timeout_s)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _bandwidth(agent: NixlAgent, op: Op, probe: Probe, probe_bytes: int, *, repeats: int,
               timeout_s: float) -> float:
    """Bytes per second from the slope between a quarter and a whole probe (fixed costs cancel);
    the whole probe's plain rate when noise makes the slope meaningless."""
    quarter = max(probe_bytes // 4, 1)
    times = [_time(agent, op, probe, np.array([n], dtype=np.uint64), repeats=repeats, timeout_s=timeout_s)
             for n in (quarter, probe_bytes)]
    slope = (times[1] - times[0]) / (probe_bytes - quarter) if probe_bytes > quarter else 0.0
    plain = probe_bytes / times[1]
    return 1.0 / slope if slope > 1.0 / (100 * plain) else plain


def copy_bytes_per_s(device: torch.device, num_bytes: int, *, repeats: int = 5) -> float:
    """A device-to-device (or host memcpy) copy of `num_bytes`, the cost of a gather or scatter."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return num_bytes / statistics.median(samples)


SMALL_PROBE_BYTES = 4096


def num_small_probes(probe_bytes: int, *, most: int) -> int:
    """How many spaced `SMALL_PROBE_BYTES` descriptors fit a probe area (at least one, at most
    `most`): what `calibrate` needs to measure the per-descriptor cost."""
    return max(1, min(most, probe_bytes // (2 * SMALL_PROBE_BYTES)))


def calibrate(agent: NixlAgent, probe: Probe, device: torch.device, *, probe_bytes: int = 64 << 20,
              small_bytes: int = 16 << 10, num_small: int = 1024, repeats: int = 3,
              timeout_s: float = 30.0) -> FabricCosts:
    if 2 * num_small * small_bytes > probe_bytes:
        raise ConfigError(f"calibrate: {num_small} x {small_bytes} bytes, spaced, exceed probe_bytes={probe_bytes}")
    fixed = _time(agent, Op.WRITE, probe, np.array([256], dtype=np.uint64), repeats=repeats, timeout_s=timeout_s)
    bandwidth = {op: _bandwidth(agent, op, probe, probe_bytes, repeats=repeats, timeout_s=timeout_s)
                 for op in (Op.READ, Op.WRITE)}
    small = _time(agent, Op.WRITE, probe, np.full(num_small, small_bytes, dtype=np.uint64),
                  repeats=repeats, timeout_s=timeout_s)
    per_descriptor = max((small - fixed - num_small * small_bytes / bandwidth[Op.WRITE]) / num_small, 1e-9)
    costs = FabricCosts(
        per_transfer_s=fixed, per_descriptor_s=per_descriptor, read_bytes_per_s=bandwidth[Op.READ],
        write_bytes_per_s=bandwidth[Op.WRITE], copy_bytes_per_s=copy_bytes_per_s(device, probe_bytes))
    log.info("calibrated against %s: %.1f us per transfer, %.2f us per descriptor, read %.1f GB/s, "
             "write %.1f GB/s, copy %.1f GB/s", probe.peer, costs.per_transfer_s * 1e6,
             costs.per_descriptor_s * 1e6, costs.read_bytes_per_s / 1e9, costs.write_bytes_per_s / 1e9,
             costs.copy_bytes_per_s / 1e9)
    return costs
