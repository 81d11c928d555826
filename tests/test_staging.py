"""Gather/scatter through a staging slot reproduces exactly what direct span copies give, for
every layout pair and TP mapping the planner supports (CPU; the GPU run is byte-verified by
`kvxfer bench --device cuda`)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given
from test_plan_properties import make_rank, scenarios

from kvxfer.agents.staging import Gather, StagingPool
from kvxfer.agents.unit_copy import UnitCopier, can_share
from kvxfer.errors import ConfigError, TransferTimeout
from kvxfer.planning import (
    Fallback,
    heads_of_rank,
    layer_offsets,
    map_tp,
    pair,
    request_block_ids,
    request_layer_offsets,
    unit_terms,
)


@given(scenarios())
def test_gather_then_scatter_equals_direct_copy(sc):
    rng = np.random.default_rng(sc["seed"])
    total, n = sc["total"], sc["num_tokens"]
    mapping = map_tp(total, sc["prefill_tp"], sc["decode_tp"])
    a = mapping.assignments[-1]
    common = dict(num_layers=sc["num_layers"], total=total, head_dim=sc["head_dim"], dtype=sc["dtype"],
                  contiguous_layers=False, rng=rng, num_tokens=n)
    bp, bd = sc["block_sizes"]
    src = make_rank(sc["layouts"][0], base=0, num_blocks=2 * -(-n // bp) + 2, block_size=bp,
                    heads=heads_of_rank(total, sc["prefill_tp"], a.prefill_rank), **common)
    dst = make_rank(sc["layouts"][1], base=1 << 40, num_blocks=2 * -(-n // bd) + 2, block_size=bd,
                    heads=heads_of_rank(total, sc["decode_tp"], a.decode_rank), **common)
    expected = dst.arena.copy()
    plan = pair(src.region, dst.region, a.heads, fallback=Fallback.FINE)
    src_off, dst_off = request_layer_offsets(plan, src.block_ids, dst.block_ids, n)
    # direct: unit by unit, layer by layer, in the arenas
    for layer in range(sc["num_layers"]):
        s_base = int(src.region.layer_addrs[layer])
        d_base = int(dst.region.layer_addrs[layer]) - (1 << 40)
        for so, do in zip(src_off.tolist(), dst_off.tolist(), strict=True):
            expected[d_base + do : d_base + do + plan.unit_bytes] = src.arena[s_base + so : s_base + so + plan.unit_bytes]
    # staged: gather on one side, scatter on the other
    send = Gather.build(src_off, plan.unit_bytes, src.region.desc.layer_bytes, torch.device("cpu"))
    recv = Gather.build(dst_off, plan.unit_bytes, dst.region.desc.layer_bytes, torch.device("cpu"))
    slot = torch.empty(send.bytes_per_layer * sc["num_layers"], dtype=torch.uint8)
    assert send.bytes_per_layer == recv.bytes_per_layer == src_off.size * plan.unit_bytes
    send.gather(src.tensors, slot)
    recv.scatter(slot, dst.tensors)
    assert np.array_equal(dst.arena, expected)


@given(scenarios())
def test_unit_terms_of_the_largest_request_serve_every_shorter_one(sc):
    """What the GPU unit copier computes on the device: tables built once for its largest
    request (ids laid out rows x capacity), looked up with a shorter request's ids, give exactly
    that request's `layer_offsets`, as a prefix."""
    rng = np.random.default_rng(sc["seed"])
    total, n = sc["total"], sc["num_tokens"]
    a = map_tp(total, sc["prefill_tp"], sc["decode_tp"]).assignments[0]
    bp, bd = sc["block_sizes"]
    common = dict(num_layers=1, total=total, head_dim=sc["head_dim"], dtype=sc["dtype"],
                  contiguous_layers=True, rng=rng, num_tokens=n)
    capacity = n + int(rng.integers(0, 3 * bp + 1))
    src = make_rank(sc["layouts"][0], base=0, num_blocks=2 * -(-capacity // bp) + 2, block_size=bp,
                    heads=heads_of_rank(total, sc["prefill_tp"], a.prefill_rank), **common)
    dst = make_rank(sc["layouts"][1], base=1 << 40, num_blocks=2 * -(-n // bd) + 2, block_size=bd,
                    heads=heads_of_rank(total, sc["decode_tp"], a.decode_rank), **common)
    plan = pair(src.region, dst.region, a.heads, fallback=Fallback.FINE)
    max_blocks = -(-capacity // bp)
    which, within = unit_terms(plan, 0, capacity, id_row_stride=max_blocks)
    assert which.size == plan.units_per_layer(capacity)  # what the copier and the cost model count
    ids = request_block_ids(src.region.desc, src.block_ids, n, who="local")
    table = np.full((ids.shape[0], max_blocks), -1, dtype=np.int64)  # unused slots stay invalid
    table[:, : ids.shape[1]] = ids
    expected = layer_offsets(plan, 0, src.block_ids, n)
    got = table.reshape(-1)[which[: expected.size]] * src.region.desc.block_stride + within[: expected.size]
    assert np.array_equal(got, expected)


def test_unit_copier_refuses_a_device_without_cuda():
    plan_rank = dict(num_layers=1, total=1, head_dim=8, dtype="float32", contiguous_layers=True,
                     rng=np.random.default_rng(0), num_tokens=4)
    src = make_rank("flashinfer-hnd", base=0, num_blocks=4, block_size=4, heads=heads_of_rank(1, 1, 0), **plan_rank)
    plan = pair(src.region, src.region, heads_of_rank(1, 1, 0))
    with pytest.raises(ConfigError, match="needs CUDA and Triton"):
        UnitCopier([plan], 0, src.tensors, torch.empty(64, dtype=torch.uint8), max_tokens=4, to_slot=True)


def test_one_copier_serves_the_head_slices_a_prefill_rank_sends():
    """A prefill rank's slices for decode TP 2 differ only in their heads: one copier (one upload,
    one kernel) can gather both. A slice for a decode rank with another block size cannot share."""
    common = dict(num_layers=2, total=8, head_dim=8, dtype="float32", contiguous_layers=False,
                  rng=np.random.default_rng(0), num_tokens=64)
    src = make_rank("flashinfer-hnd", base=0, num_blocks=16, block_size=16, heads=heads_of_rank(8, 1, 0), **common)

    def plan_to(rank: int, block_size: int):
        dst = make_rank("flashinfer-hnd", base=(rank + 1) << 40, num_blocks=32, block_size=block_size,
                        heads=heads_of_rank(8, 2, rank), **common)
        return pair(src.region, dst.region, map_tp(8, 1, 2).assignments[rank].heads)

    slices = [plan_to(0, 16), plan_to(1, 16)]
    assert can_share(slices, 0, 64)
    assert not can_share([slices[0], plan_to(1, 4)], 0, 64)  # 4-token chunks against 16
    # what they share is exactly the block each unit lies in, not the offset inside it
    (which0, within0), (which1, within1) = (unit_terms(p, 0, 64, id_row_stride=4) for p in slices)
    assert np.array_equal(which0, which1) and not np.array_equal(within0, within1)


def test_pool_back_pressure_and_errors():
    pool = StagingPool(slot_bytes=64, num_slots=1, device="cpu")
    slot = pool.acquire(64, timeout_s=0.1)
    with pytest.raises(TransferTimeout, match="staging pool full"):
        pool.acquire(8, timeout_s=0.05)
    threading.Timer(0.05, pool.release, args=(slot,)).start()
    again = pool.acquire(8, timeout_s=2.0)  # woken by the release
    assert again.index == slot.index
    with pytest.raises(ConfigError, match="do not fit a slot of 64"):
        pool.acquire(65, timeout_s=0.1)
    pool.release(again)
    with pytest.raises(ConfigError, match="released twice"):
        pool.release(again)


def test_staged_write_refuses_an_offset_outside_the_peers_slots():
    """The producer checks a consumer-given offset against the consumer's registered slots area
    before anything moves (nothing else is touched, so no agent is needed to see the refusal)."""
    from kvxfer.agents.messages import StagingInfo
    from kvxfer.agents.staged_transfer import stage_part, torch_parts
    from kvxfer.errors import PlanError

    rank = dict(num_layers=2, total=1, head_dim=8, dtype="float32", contiguous_layers=True,
                rng=np.random.default_rng(0), num_tokens=8)
    src = make_rank("flashinfer-hnd", base=0, num_blocks=4, block_size=4, heads=heads_of_rank(1, 1, 0), **rank)
    plan = pair(src.region, src.region, heads_of_rank(1, 1, 0))
    part = torch_parts([plan], src.block_ids, 8, src.tensors, to_slot=True)
    (num_bytes,) = part.sizes
    remote = StagingInfo(probe_addr=0, probe_bytes=0, slots_addr=1 << 30, slots_bytes=num_bytes + 8)
    for offset in (16, -8):
        with pytest.raises(PlanError, match="reaches outside the peer's staging slots"):
            stage_part(None, part, remote=remote, remote_offset=offset, wait_s=1.0)
