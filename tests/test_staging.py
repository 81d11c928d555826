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
from kvxfer.errors import ConfigError, TransferTimeout
from kvxfer.planning import Fallback, heads_of_rank, map_tp, pair, request_layer_offsets


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
