"""Transfer and lease metrics in a prometheus-client registry of their own (never the global one),
so several agents can live in one process and tests can read exact values. Daemons expose
`registry` over HTTP later (`render()` gives the text format)."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from ~10 us (notification-sized) to ~10 s (multi-GiB over TCP).
_TIME_BUCKETS = (1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Stats(Protocol):
    """What a transfer's telemetry provides (kvxfer.agents.nixl_agent.XferStats)."""

    post_us: int
    xfer_us: int
    num_bytes: int
    num_descriptors: int


class TransferMetrics:
    """Counters and histograms of one process's transfers and leases."""

    def __init__(self, registry: CollectorRegistry | None = None, *, namespace: str = "kvxfer") -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self.bytes = Counter("transfer_bytes", "Bytes moved by completed transfers", ["op"],
                             namespace=ns, registry=r)
        self.descriptors = Counter("transfer_descriptors", "Descriptors posted (after NIXL merging)",
                                   ["op"], namespace=ns, registry=r)
        self.transfers = Counter("transfers", "Completed transfers", ["op"], namespace=ns, registry=r)
        self.post_seconds = Histogram("transfer_post_seconds", "Time to post a transfer", ["op"],
                                      buckets=_TIME_BUCKETS, namespace=ns, registry=r)
        self.transfer_seconds = Histogram("transfer_seconds", "Post to completion", ["op"],
                                          buckets=_TIME_BUCKETS, namespace=ns, registry=r)
        self.failures = Counter("failures", "Failures by kind (kvxfer error kind)", ["kind"],
                                namespace=ns, registry=r)
        self.blocks_held = Gauge("blocks_held", "Blocks held under leases", namespace=ns, registry=r)
        self.leases_active = Gauge("leases_active", "Leases currently held", namespace=ns, registry=r)
        self.leases_ended = Counter("leases_ended", "Leases ended, by how", ["outcome"],
                                    namespace=ns, registry=r)

    def observe_transfer(self, op: str, stats: Stats) -> None:
        self.transfers.labels(op).inc()
        self.bytes.labels(op).inc(stats.num_bytes)
        self.descriptors.labels(op).inc(stats.num_descriptors)
        self.post_seconds.labels(op).observe(stats.post_us / 1e6)
        self.transfer_seconds.labels(op).observe(stats.xfer_us / 1e6)

    def observe_failure(self, kind: str) -> None:
        self.failures.labels(kind).inc()

    def observe_leases(self, *, num_leases: int, num_blocks: int) -> None:
        self.leases_active.set(num_leases)
        self.blocks_held.set(num_blocks)

    def lease_ended(self, outcome: str) -> None:
        self.leases_ended.labels(outcome).inc()

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0.0 when never set), e.g. value("kvxfer_failures_total", kind="timeout")."""
        got = self.registry.get_sample_value(name, labels)
        return 0.0 if got is None else got

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
