"""Peer death: a producer SIGKILLed while the consumer reads from it (READ), or before it pushed
what the consumer waits for (WRITE), ends the consumer's request with a typed error within the
deadline, never a hang."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from kvxfer.agents.messages import MemoryKind
from kvxfer.agents.nixl_agent import AgentConfig, ErrorHandling, NixlAgent, Op
from kvxfer.errors import TransferError, TransferTimeout

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NUM_BYTES = 64 << 20
UNIT = 4096  # small descriptors: a READ takes long enough to be killed in the middle
DEADLINE_S = 5.0


def _producer(conn, error_handling: str) -> None:
    """Register a buffer, hand over metadata and its address, then progress until killed."""
    buf = torch.ones(NUM_BYTES, dtype=torch.uint8)
    agent = NixlAgent(AgentConfig(name="producer", error_handling=ErrorHandling(error_handling)))
    agent.register([buf])
    conn.send_bytes(agent.metadata())
    conn.send_bytes(np.array([buf.data_ptr()], dtype=np.uint64).tobytes())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        agent.progress()
        time.sleep(0.001)


def _rows(base: int) -> np.ndarray:
    n = NUM_BYTES // UNIT
    rows = np.zeros((n, 3), dtype=np.uint64)
    rows[:, 0] = base + np.arange(n, dtype=np.uint64) * UNIT
    rows[:, 1] = UNIT
    return rows


@pytest.fixture(params=["none", "peer"])
def consumer(request):
    """(agent, producer process, local list, remote list) with the link warmed by one READ."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_producer, args=(theirs, request.param), daemon=True)
    proc.start()
    assert ours.poll(60), "producer did not start"
    metadata = ours.recv_bytes()
    base = int(np.frombuffer(ours.recv_bytes(), dtype=np.uint64)[0])
    dst = torch.zeros(NUM_BYTES, dtype=torch.uint8)
    agent = NixlAgent(AgentConfig(name="consumer", error_handling=ErrorHandling(request.param)))
    agent.register([dst])
    peer = agent.add_peer(metadata)
    local = agent.prepare(_rows(dst.data_ptr()), mem=MemoryKind.DRAM)
    remote = agent.prepare(_rows(base), mem=MemoryKind.DRAM, peer=peer)
    idx = np.arange(NUM_BYTES // UNIT, dtype=np.int32)[:1024]
    agent.wait([agent.post(Op.READ, local, idx, remote, idx)], timeout_s=DEADLINE_S)
    yield agent, proc, local, remote
    agent.close()
    if proc.is_alive():
        proc.kill()
    proc.join(5)


def test_producer_killed_during_read(consumer):
    agent, proc, local, remote = consumer
    idx = np.random.default_rng(0).permutation(NUM_BYTES // UNIT).astype(np.int32)
    killer = threading.Timer(0.05, os.kill, args=(proc.pid, signal.SIGKILL))
    t0 = time.monotonic()
    killer.start()
    with pytest.raises(TransferError) as err:
        while time.monotonic() - t0 < 30:  # read again and again until the death is seen
            agent.wait([agent.post(Op.READ, local, idx, remote, idx)], timeout_s=DEADLINE_S)
    killer.join()
    assert time.monotonic() - t0 < 0.05 + DEADLINE_S + 1.0
    assert err.value.kind in ("peer_gone", "transfer", "timeout")


def test_killed_producer_never_notifies(consumer):
    agent, proc, _, _ = consumer
    proc.kill()
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout, match="0 of 1 notification"):
        agent.wait_notifs(1, timeout_s=1.0)
    assert time.monotonic() - t0 < 2.0
