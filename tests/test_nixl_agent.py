"""The NIXL seam with real agents in one process (DRAM loopback between two agents): READ and
WRITE through prepared lists and through explicit spans, notifications, deadlines, metrics and
the translation of NIXL failures into kvxfer errors. Cross-process tests live beside this file."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from kvxfer.agents.messages import MemoryKind
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.nixl_agent import (
    AgentConfig,
    Backoff,
    NixlAgent,
    Op,
    PollPolicy,
    Threading,
)
from kvxfer.errors import ConfigError, PeerGoneError, TransferError, TransferTimeout

UNIT = 256
NUM_UNITS = 64


def _rows(t: torch.Tensor) -> np.ndarray:
    """One (address, UNIT, 0) row per UNIT bytes of `t`."""
    n = t.numel() * t.element_size() // UNIT
    rows = np.zeros((n, 3), dtype=np.uint64)
    rows[:, 0] = t.data_ptr() + np.arange(n, dtype=np.uint64) * UNIT
    rows[:, 1] = UNIT
    return rows


@pytest.fixture
def pair():
    """Two agents, each with one registered tensor, knowing each other."""
    metrics = TransferMetrics()
    a = NixlAgent(AgentConfig(name="test-a"), metrics=metrics)
    b = NixlAgent(AgentConfig(name="test-b"))
    ta = torch.zeros(NUM_UNITS * UNIT, dtype=torch.uint8)
    tb = torch.randint(0, 256, (NUM_UNITS * UNIT,), dtype=torch.uint8)
    assert a.register([ta]) is MemoryKind.DRAM
    b.register([tb])
    assert a.add_peer(b.metadata()) == "test-b"
    assert b.add_peer(a.metadata()) == "test-a"
    yield a, b, ta, tb, metrics
    a.close()
    b.close()


def test_prepped_read_then_write(pair):
    a, b, ta, tb, metrics = pair
    local = a.prepare(_rows(ta), mem=MemoryKind.DRAM)
    remote = a.prepare(_rows(tb), mem=MemoryKind.DRAM, peer="test-b")
    perm = np.random.default_rng(0).permutation(NUM_UNITS).astype(np.int32)
    x = a.post(Op.READ, local, perm, remote, np.arange(NUM_UNITS, dtype=np.int32))
    (stats,) = a.wait([x], timeout_s=10)
    # ta unit perm[i] <- tb unit i
    want = tb.view(NUM_UNITS, UNIT)[np.argsort(perm)]
    assert torch.equal(ta.view(NUM_UNITS, UNIT), want)
    assert stats.num_bytes == NUM_UNITS * UNIT
    ta.copy_(torch.arange(ta.numel(), dtype=torch.int64).to(torch.uint8))
    idx = np.arange(8, dtype=np.int32)
    a.wait([a.post(Op.WRITE, local, idx, remote, idx + 8)], timeout_s=10)
    assert torch.equal(tb[8 * UNIT:16 * UNIT], ta[:8 * UNIT])
    assert metrics.value("kvxfer_transfer_bytes_total", op="read") == NUM_UNITS * UNIT
    assert metrics.value("kvxfer_transfers_total", op="write") == 1


def test_spans_path(pair):
    a, b, ta, tb, _ = pair
    local, remote = _rows(ta)[:4], _rows(tb)[10:14]
    merged_local = np.array([[local[0, 0], 4 * UNIT, 0]], dtype=np.uint64)
    merged_remote = np.array([[remote[0, 0], 4 * UNIT, 0]], dtype=np.uint64)
    x = a.post_spans(Op.READ, merged_local, merged_remote, peer="test-b",
                     local_mem=MemoryKind.DRAM, remote_mem=MemoryKind.DRAM)
    (stats,) = a.wait([x], timeout_s=10)
    assert torch.equal(ta[:4 * UNIT], tb[10 * UNIT:14 * UNIT])
    assert stats.num_descriptors == 1


def test_notifications_carry_payloads(pair):
    a, b, _, _, _ = pair
    a.send_notif("test-b", b"\x01payload")
    a.send_notif("test-b", b"second")
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        a.progress()
        got += b.collect_notifs()
    assert got == [("test-a", b"\x01payload"), ("test-a", b"second")]


def test_waiting_for_a_silent_peer_times_out(pair):
    a, _, _, _, metrics = pair
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout, match="0 of 1 notification"):
        a.wait_notifs(1, timeout_s=0.2)
    assert time.monotonic() - t0 < 1.0
    assert metrics.value("kvxfer_failures_total", kind="timeout") == 1


@pytest.mark.parametrize(
    ("local_idx", "remote_idx", "match"),
    [
        (np.array([0, NUM_UNITS]), np.array([0, 1]), "local index 64 outside"),
        (np.array([0]), np.array([-1]), "remote index -1 outside"),
        (np.array([0, 1]), np.array([0]), "2 local indices but 1 remote"),
        (np.array([], dtype=np.int32), np.array([], dtype=np.int32), "non-empty"),
    ],
)
def test_bad_indices_are_refused_and_named(pair, local_idx, remote_idx, match):
    """Out-of-range indices are NIXL's to refuse (it checks every one as it makes the transfer,
    so requests do not pay for the check twice); the error then names the index and the list's
    range. Shapes and counts are refused before NIXL is asked."""
    a, _, ta, tb, _ = pair
    local = a.prepare(_rows(ta), mem=MemoryKind.DRAM)
    remote = a.prepare(_rows(tb), mem=MemoryKind.DRAM, peer="test-b")
    with pytest.raises(ConfigError, match=match):
        a.post(Op.READ, local, local_idx, remote, remote_idx)


def test_nixl_failures_become_kvxfer_errors(pair):
    a, _, ta, _, _ = pair
    with pytest.raises(PeerGoneError, match="peer nobody"):
        a.prepare(_rows(ta), mem=MemoryKind.DRAM, peer="nobody")
    with pytest.raises(PeerGoneError):
        a.send_notif("nobody", b"x")
    unregistered = torch.zeros(UNIT, dtype=torch.uint8)
    with pytest.raises(TransferError, match="unregistered memory"):
        a.prepare(_rows(unregistered), mem=MemoryKind.DRAM)


def test_removed_peer_is_gone(pair):
    a, _, ta, tb, _ = pair
    a.release_list(a.prepare(_rows(tb), mem=MemoryKind.DRAM, peer="test-b"))
    a.remove_peer("test-b")
    assert "test-b" not in a.peers
    with pytest.raises(PeerGoneError):
        a.prepare(_rows(tb), mem=MemoryKind.DRAM, peer="test-b")


def test_register_refuses_what_nixl_cannot_take():
    with NixlAgent(AgentConfig(name="test-reg", threading=Threading.PROGRESS_THREAD)) as a:
        with pytest.raises(ConfigError, match="not contiguous"):
            a.register([torch.zeros(8, 8).t()])
        with pytest.raises(ConfigError, match="no tensors"):
            a.register([])


def test_backoff():
    backoff = Backoff(PollPolicy(spin_s=0, min_sleep_s=1e-4, max_sleep_s=4e-4))
    t0 = time.monotonic()
    for _ in range(5):
        backoff.pause()  # 0.1 + 0.2 + 0.4 + 0.4 + 0.4 ms
    assert 1.4e-3 <= time.monotonic() - t0 < 0.1
