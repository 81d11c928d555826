"""Invalid pairings and requests raise one typed error naming the field and both values."""

import numpy as np
import pytest

from kvxfer.errors import LayoutError, PlanError
from kvxfer.layouts import CacheRegion, describe, describe_shape
from kvxfer.planning import Fallback, HeadRange, pair, request_indices, request_spans


def region(layout="flashinfer-hnd", *, heads=(0, 8), total=8, head_dim=16, dtype="bfloat16",
           layers=2, blocks=8, block_size=16):
    desc = describe(layout, num_layers=layers, num_blocks=blocks, block_size=block_size,
                    num_heads=heads[1] - heads[0], first_head=heads[0], total_heads=total,
                    head_dim=head_dim, dtype=dtype)
    return CacheRegion(desc, np.arange(layers, dtype=np.uint64) << 32)


@pytest.mark.parametrize(
    "remote,message",
    [
        (region(head_dim=32), "head_dim local=16 remote=32"),
        (region(dtype="float16"), "dtype local='bfloat16' remote='float16'"),
        (region(layers=3), "num_layers local=2 remote=3"),
        (region(total=16, heads=(0, 8)), "total_heads local=8 remote=16"),
    ],
)
def test_incompatible_caches(remote, message):
    with pytest.raises(PlanError, match=message):
        pair(region(), remote, HeadRange(0, 8))


def test_every_mismatch_reported_at_once():
    with pytest.raises(PlanError) as err:
        pair(region(), region(head_dim=32, dtype="float16"), HeadRange(0, 8))
    assert "head_dim" in str(err.value) and "dtype" in str(err.value)


def test_head_range_outside_remote_rank():
    with pytest.raises(PlanError, match=r"head range \[0, 8\) outside remote rank heads \[0, 4\)"):
        pair(region(), region(heads=(0, 4)), HeadRange(0, 8))


def test_nhd_head_slice_refused_without_fallback():
    local = region("flashinfer-nhd", heads=(0, 4))
    remote = region("flashinfer-nhd")
    with pytest.raises(PlanError, match="not contiguous per block on both sides"):
        pair(local, remote, HeadRange(0, 4))
    plan = pair(local, remote, HeadRange(0, 4), fallback=Fallback.FINE)
    assert plan.unit_bytes == 4 * 16 * 2  # one token's 4 heads


def test_hnd_head_slice_is_one_span_per_block_and_kv():
    plan = pair(region(heads=(0, 4)), region(), HeadRange(0, 4))
    spans = request_spans(plan, np.array([3, 1]), np.array([5, 2]), 32)
    assert plan.unit_bytes == 4 * 16 * 16 * 2  # (b-a) * block_size * D * 2 bytes
    assert spans.num_descriptors == 2 * 2 * 2  # layers x blocks x (K, V)


@pytest.mark.parametrize(
    "local_ids,remote_ids,tokens,message",
    [
        ([0, 8], [0, 1], 32, r"local flashinfer-hnd: block id 8 outside \[0, 8\)"),
        ([0, 1], [-1, 1], 32, r"remote flashinfer-hnd: block id -1 outside \[0, 8\)"),
        ([0, 1], [0, 1, 2], 32, "remote block ids: 32 tokens at block_size=16 need 2 blocks, got 3"),
        ([1, 1], [0, 1], 32, "local block ids: block 1 appears more than once"),
        ([0, 1], [0, 1], 0, "num_tokens=0 must be positive"),
        ([0.5, 1], [0, 1], 32, "block ids must be integers"),
    ],
)
def test_bad_requests(local_ids, remote_ids, tokens, message):
    plan = pair(region(), region(), HeadRange(0, 8))
    with pytest.raises(PlanError, match=message):
        request_spans(plan, np.array(local_ids), np.array(remote_ids), tokens)
    with pytest.raises(PlanError, match=message):
        request_indices(plan, np.array(local_ids), np.array(remote_ids), tokens)


def test_remote_strides_pointing_outside_region_are_refused():
    import msgspec

    evil = msgspec.structs.replace(region().desc, block_stride=10**9)
    with pytest.raises(PlanError, match="strides reach byte"):
        pair(region(), CacheRegion(evil, np.zeros(2, dtype=np.uint64)), HeadRange(0, 8))


def test_block_size_conversion_uses_gcd_chunks():
    plan = pair(region(block_size=16, blocks=4), region(block_size=64, blocks=2), HeadRange(0, 8))
    assert plan.chunk_tokens == 16
    plan = pair(region(block_size=64, blocks=2), region(block_size=16, blocks=4), HeadRange(0, 8))
    assert plan.chunk_tokens == 16


def test_describe_shape_round_trip_and_errors():
    desc = describe_shape("packed", (10, 4, 16, 256), num_layers=2, dtype="float32")
    assert (desc.num_blocks, desc.num_heads, desc.block_size, desc.head_dim) == (10, 4, 16, 128)
    with pytest.raises(LayoutError, match=r"packed: shape \(10, 4, 16\) is not"):
        describe_shape("packed", (10, 4, 16), num_layers=2, dtype="float32")
    with pytest.raises(LayoutError, match="layout='nope' is not one of"):
        describe_shape("nope", (1,), num_layers=1, dtype="float32")
