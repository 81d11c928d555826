"""Each layout's byte strides address exactly the element its documented memory order says,
written out by hand here (independent of both kvxfer.layouts and kvxfer.verify)."""

import numpy as np
import pytest
import torch

from kvxfer.layouts import describe
from kvxfer.verify import block_view

N, H, BS, D = 3, 2, 4, 5


def flat_index(layout, b, kv, h, t, d):
    """Where (block, kv, head, token, dim) lives in the per-layer tensor, by its documented order."""
    return {
        "flashinfer-hnd": (((b * 2 + kv) * H + h) * BS + t) * D + d,
        "flashinfer-nhd": (((b * 2 + kv) * BS + t) * H + h) * D + d,
        "flash-attn-hnd": (((kv * N + b) * H + h) * BS + t) * D + d,
        "flash-attn-nhd": (((kv * N + b) * BS + t) * H + h) * D + d,
        # vLLM CPU_ATTN: per (block, head), BS K rows then BS V rows
        "packed": (((b * H + h) * 2 + kv) * BS + t) * D + d,
    }[layout]


@pytest.mark.parametrize("layout", ["flashinfer-hnd", "flashinfer-nhd", "flash-attn-hnd", "flash-attn-nhd", "packed"])
def test_strides_and_torch_view_match_the_documented_order(layout):
    desc = describe(layout, num_layers=1, num_blocks=N, block_size=BS, num_heads=H, head_dim=D, dtype="float32")
    cache = torch.arange(int(np.prod(desc.shape)), dtype=torch.float32).view(desc.shape)
    view = block_view(layout, cache)  # [N, kv, H, BS, D]
    for b, kv, h, t in np.ndindex(N, 2, H, BS):
        want = flat_index(layout, b, kv, h, t, 0)
        got = (b * desc.block_stride + kv * desc.kv_stride + h * desc.head_stride + t * desc.token_stride) // 4
        assert got == want, (b, kv, h, t)
        assert int(view[b, kv, h, t, 0]) == want
