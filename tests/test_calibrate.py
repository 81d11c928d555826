"""Calibration runs real probe transfers between two NIXL agents (one process, DRAM) and yields
a usable cost model; on this CPU machine it says staging does not pay for a per-block plan."""

import torch

from kvxfer.agents.calibrate import Probe, calibrate
from kvxfer.agents.nixl_agent import AgentConfig, MemKind, NixlAgent
from kvxfer.planning.cost import Path, choose


def test_calibrated_costs_are_positive_and_pick_a_path():
    size = 8 << 20
    with NixlAgent(AgentConfig(name="calib-a")) as a, NixlAgent(AgentConfig(name="calib-b")) as b:
        src, dst = torch.zeros(size, dtype=torch.uint8), torch.zeros(size, dtype=torch.uint8)
        a.register([src])
        b.register([dst])
        peer = a.add_peer(b.metadata())
        b.add_peer(a.metadata())
        probe = Probe(src.data_ptr(), dst.data_ptr(), 0, 0, MemKind.DRAM, MemKind.DRAM, peer)
        costs = calibrate(a, probe, torch.device("cpu"), probe_bytes=size, small_bytes=4096, num_small=256)
    assert costs.per_descriptor_s < 1e-3
    assert costs.write_bytes_per_s > 1e8 and costs.copy_bytes_per_s > 1e8
    choice = choose(costs, num_bytes=1 << 30, descriptors=16384)
    assert choice.best.path in (Path.DIRECT, Path.STAGED)
    assert "direct descriptors" in choice.describe()
