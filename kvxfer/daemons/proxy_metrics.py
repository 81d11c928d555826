"""The proxy's Prometheus metrics: what its clients see (outcomes, latency, time to first token,
inter-token latency), per backend kind, and each failed attempt at a backend by kind of error
(attempts that a retry or another server then saved included)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

# Seconds; from loopback CPU runs (milliseconds) to a loaded GPU node's long prompts.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ProxyMetrics:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvxfer_proxy_requests", "Requests by outcome (ok, or the error "
                                "type the client got)", ["outcome", "backend", "endpoint"], registry=r)
        self.latency = Histogram("kvxfer_proxy_request_seconds", "End-to-end request latency",
                                 ["backend", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("kvxfer_proxy_time_to_first_token_seconds", "Streams: request in to "
                              "first token out", ["backend", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kvxfer_proxy_inter_token_seconds", "Streams: time between chunks "
                             "relayed after the first", ["backend", "endpoint"], buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.prefill = Histogram("kvxfer_proxy_prefill_seconds", "Prefill step of a request",
                                 ["backend"], buckets=_LATENCY_BUCKETS, registry=r)
        self.backend_errors = Counter("kvxfer_proxy_backend_errors", "Failed attempts at a backend "
                                      "server by pool and kind", ["pool", "kind", "backend"], registry=r)
        self.retries = Counter("kvxfer_proxy_retries", "Decode failures retried through a fresh "
                               "prefill", ["backend"], registry=r)
        self.rehearsals = Counter("kvxfer_proxy_rehearsals", "Requests of the proxy's own through a "
                                  "(prefill, decode) pair before its first client request, by outcome (ok, "
                                  "or the error's kind)", ["outcome", "backend"], registry=r)

    def outcome(self, endpoint: str, outcome: str, started: float | None = None) -> None:
        self.requests.labels(outcome, self.backend, endpoint).inc()
        if started is not None:
            self.latency.labels(self.backend, endpoint).observe(time.monotonic() - started)

    def backend_error(self, pool: str, kind: str) -> None:
        self.backend_errors.labels(pool, kind, self.backend).inc()

    def rehearsed(self, outcome: str) -> None:
        self.rehearsals.labels(outcome, self.backend).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def timed(self, chunks: AsyncIterator[bytes], endpoint: str, started: float) -> AsyncIterator[bytes]:
        """Relay a stream's chunks, observing time to the first and between later ones (a chunk
        as the network delivers it: usually one event, as vLLM's benchmark counts them)."""
        last = None
        async for chunk in chunks:
            if chunk.startswith(b"data: [DONE]") or b'"choices":[]' in chunk:  # the end, the usage: no token
                yield chunk
                continue
            now = time.monotonic()
            if last is None:
                self.ttft.labels(self.backend, endpoint).observe(now - started)
            else:
                self.itl.labels(self.backend, endpoint).observe(now - last)
            last = now
            yield chunk
