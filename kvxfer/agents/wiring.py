"""Wiring a NIXL connection before its first transfer, from either side of a pair.

`NixlAgent.connect` makes the endpoint, but UCX wires a connection's RDMA lanes only at its first
transfer: 10 ms and more on this CPU machine, 1-3 ms often, which a request's first READ (the
consumer's connection) or first push (the producer's) would otherwise wait for. One small
transfer in the direction the pair's requests will go (a consumer READs, a producer WRITEs)
between the two probe areas, which never hold data (the areas calibration uses,
`Endpoint.calibrate`), wires it.
"""

from __future__ import annotations

import numpy as np

from kvxfer.agents.endpoint import Endpoint
from kvxfer.agents.nixl_agent import Op, device_id
from kvxfer.agents.peers import Peer

PROBE_READ_BYTES = 4096


def wire_connection(endpoint: Endpoint, peer: Peer, *, timeout_s: float, op: Op = Op.READ) -> None:
    """Connect to `peer` and wire the connection with one probe transfer, `op` (only connect
    where a side has no probe area). Call under the NIXL lock; raises the KvxferError of a
    failed transfer."""
    endpoint.agent.connect(peer.agent_name)
    remote = peer.info.staging
    if endpoint.staging is None or remote is None:
        return
    probe = endpoint.staging.probe
    size = min(PROBE_READ_BYTES, probe.numel(), remote.probe_bytes)
    local_span = np.array([[probe.data_ptr(), size, device_id(probe)]], dtype=np.uint64)
    remote_span = np.array([[remote.probe_addr, size, remote.device_id]], dtype=np.uint64)
    xfer = endpoint.agent.post_spans(op, local_span, remote_span, peer=peer.agent_name,
                                     local_mem=endpoint.staging.mem, remote_mem=remote.memory, probe=True)
    endpoint.agent.wait([xfer], timeout_s=timeout_s)
