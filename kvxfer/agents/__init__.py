"""Agents: the NIXL seam, leases and transfer metrics (the side channel and peers live beside them).

- `kvxfer.agents.nixl_agent`: the only module that imports nixl. Import it explicitly; importing
  this package stays cheap (no nixl, no torch) so pure logic like leases loads fast.
- `kvxfer.agents.leases`: who holds which blocks for which consumers, and when they are freed.
- `kvxfer.agents.metrics`: a Prometheus registry of bytes, descriptors, times, failures, leases.
"""

from kvxfer.agents.leases import LeaseTable, Outcome, Released
from kvxfer.agents.metrics import TransferMetrics

__all__ = ["LeaseTable", "Outcome", "Released", "TransferMetrics"]
