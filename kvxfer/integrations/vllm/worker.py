"""The worker half of the connector (one per vLLM worker process, i.e. per TP rank).

`register` describes vLLM's cache tensors with a kvxfer layout and builds this rank's transfer
endpoint (NIXL agent, registered memory, peers); a producer also starts its side-channel server.
Transfers never run on vLLM's thread: jobs from the scheduler go to one service thread, which runs
loads one at a time, drives NIXL (notifications, lease expiry, queued writes), and leaves results
for `transfer_results`, which vLLM polls every step.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import torch

from kvxfer.agents.endpoint import DeadlinePolicy, Endpoint, Identity
from kvxfer.agents.messages import Role
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.nixl_agent import AgentConfig, Threading
from kvxfer.agents.sidechannel import ClientConfig, ServerConfig, SideChannelServer
from kvxfer.errors import KvxferError, LayoutError
from kvxfer.integrations.vllm.config import ConnectorConfig, ConnectorRole, TransferMode
from kvxfer.integrations.vllm.consumer import Consumer, ConsumerSettings
from kvxfer.integrations.vllm.params import LoadJob, ReleaseJob, SendJob
from kvxfer.integrations.vllm.producer import Producer
from kvxfer.integrations.vllm.stats import KvxferStats
from kvxfer.layouts import CacheDesc, describe_shape
from kvxfer.planning import heads_of_rank

log = logging.getLogger(__name__)

_IDLE_MIN_S, _IDLE_MAX_S = 0.0005, 0.01  # service thread's sleep when there is nothing to do


@dataclass(frozen=True)
class RankInfo:
    """Who this worker is, as vLLM's config and process group say."""

    tp_size: int
    tp_rank: int
    total_kv_heads: int
    boot_epoch: int
    layout: str  # kvxfer layout of vLLM's per-layer cache tensors on this platform


@dataclass
class Results:
    """What finished since vLLM last asked."""

    sending: set[str] = field(default_factory=set)
    recving: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    failed_blocks: set[int] = field(default_factory=set)


def describe_caches(kv_caches: dict[str, torch.Tensor], rank: RankInfo) -> tuple[list[torch.Tensor], CacheDesc]:
    """vLLM's per-layer tensors (in layer order) and the kvxfer description they all share."""
    tensors = list(kv_caches.values())
    if not tensors:
        raise LayoutError("register_kv_caches: vLLM handed no cache tensors")
    first = tensors[0]
    for name, t in kv_caches.items():
        if t.shape != first.shape or t.dtype != first.dtype:
            raise LayoutError(f"layer {name}: cache {tuple(t.shape)} {t.dtype} differs from "
                              f"{tuple(first.shape)} {first.dtype}; one shape for every layer is supported")
    heads = heads_of_rank(rank.total_kv_heads, rank.tp_size, rank.tp_rank)
    desc = describe_shape(rank.layout, tuple(first.shape), num_layers=len(tensors),
                          dtype=str(first.dtype).removeprefix("torch."), first_head=heads.start,
                          total_heads=rank.total_kv_heads)
    return tensors, desc


class WorkerSide:
    def __init__(self, config: ConnectorConfig, rank: RankInfo) -> None:
        self.config = config
        self.rank = rank
        self.metrics = TransferMetrics()
        self.endpoint: Endpoint | None = None
        self.producer: Producer | None = None
        self.consumer: Consumer | None = None
        self._server: SideChannelServer | None = None
        self._jobs: queue.Queue[LoadJob | ReleaseJob] = queue.Queue()
        self._lock = threading.Lock()
        self._results = Results()
        self._stats = KvxferStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- setup and teardown ----------------------------------------------------------------------

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        tensors, desc = describe_caches(kv_caches, self.rank)
        cfg, r = self.config, self.rank
        producer = cfg.role is ConnectorRole.PRODUCER
        identity = Identity(cfg.engine_id, r.boot_epoch, Role.PREFILL if producer else Role.DECODE,
                            r.tp_size, r.tp_rank, cfg.model_fingerprint)
        threading_mode = Threading.PROGRESS_THREAD if cfg.nixl_progress_thread else Threading.APP_POLL
        agent = AgentConfig(name=f"kvxfer-{cfg.engine_id}-{r.tp_rank}-{r.boot_epoch:x}", threading=threading_mode)
        self.endpoint = Endpoint(identity, tensors, desc, agent_config=agent, metrics=self.metrics,
                                 deadline=DeadlinePolicy(cfg.transfer_deadline_s, cfg.expected_gbps))
        log.info("kvxfer %s rank %d/%d: %d layers of %s %s (%s), heads [%d, %d) of %d", cfg.role.value,
                 r.tp_rank, r.tp_size, desc.num_layers, r.layout, desc.shape, desc.dtype,
                 desc.first_head, desc.first_head + desc.num_heads, desc.total_heads)
        if producer:
            self._start_producer()
        else:
            self.consumer = Consumer(self.endpoint, ConsumerSettings(
                ClientConfig(keys=cfg.keys, insecure=cfg.insecure), cfg.handshake_timeout_s,
                write=cfg.mode is TransferMode.WRITE))
        self._thread = threading.Thread(target=self._serve, name="kvxfer-worker", daemon=True)
        self._thread.start()

    def _start_producer(self) -> None:
        assert self.endpoint is not None
        cfg = self.config
        self.producer = Producer(self.endpoint, lease_s=cfg.lease_s, metrics=self.metrics)
        server = ServerConfig(host=cfg.side_channel_host, port=cfg.side_channel_port + self.rank.tp_rank,
                              keys=cfg.keys, insecure=cfg.insecure, engine_id=cfg.engine_id,
                              boot_epoch=self.rank.boot_epoch)
        self._server = SideChannelServer(server, self.producer.handle)
        self._server.start()

    def shutdown(self) -> None:
        """Stop serving, then release NIXL; a failure here is logged, never raised into vLLM's
        own shutdown."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for name, close in (("side channel", self._server and self._server.stop),
                            ("consumer", self.consumer and self.consumer.close),
                            ("endpoint", self.endpoint and self.endpoint.close)):
            try:
                if close:
                    close()
            except Exception:
                log.exception("kvxfer shutdown: closing the %s failed", name)

    # -- vLLM's thread ---------------------------------------------------------------------------

    def submit(self, sends: list[SendJob], loads: list[LoadJob], releases: list[ReleaseJob]) -> None:
        for job in sends:
            if self.producer is None:
                raise KvxferError("a kv_consumer got a request to hold blocks for a consumer")
            self.producer.hold(job)
        for item in (*loads, *releases):
            self._jobs.put(item)

    def transfer_results(self) -> Results:
        with self._lock:
            results, self._results = self._results, Results()
        if self.producer is not None:
            results.sending = self.producer.take_finished()
            if results.sending:
                self._stats.record_leases_ended(len(results.sending))
        return results

    def take_stats(self) -> KvxferStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, KvxferStats()
        return stats

    # -- service thread --------------------------------------------------------------------------

    def _serve(self) -> None:
        idle = _IDLE_MIN_S
        while not self._stop.is_set():
            try:
                busy = self._step()
            except Exception:  # the thread must outlive any bug in one step
                log.exception("kvxfer service step failed")
                busy = False
            idle = _IDLE_MIN_S if busy else min(idle * 2, _IDLE_MAX_S)
            if not busy:
                self._stop.wait(idle)

    def _step(self) -> bool:
        busy = self.producer.poll() if self.producer is not None else False
        try:
            job = self._jobs.get_nowait()
        except queue.Empty:
            return busy
        if isinstance(job, ReleaseJob):
            assert self.consumer is not None
            self.consumer.release(job.params, job.reason)
        else:
            self._load(job)
        return True

    def _load(self, job: LoadJob) -> None:
        assert self.consumer is not None
        log.info("kvxfer loading request=%s: %d tokens after %d cached, from %s", job.req_id,
                 job.num_tokens, job.skip_tokens, job.params.engine_id)
        try:
            summary = self.consumer.load(job)
        except Exception as err:  # noqa: BLE001 (a load's failure is reported, never raised)
            error = err if isinstance(err, KvxferError) else KvxferError(f"internal: {type(err).__name__}: {err}")
            log.error("kvxfer load failed request=%s producer=%s kind=%s: %s", job.req_id,
                      job.params.engine_id, error.kind, error)
            self.metrics.observe_failure(error.kind)
            with self._lock:  # reported first: telling the producer may wait on a dead peer
                self._stats.record_failure(error.kind)
                self._results.recving.add(job.req_id)
                self._results.failed.add(job.req_id)
                self._results.failed_blocks.update(job.local_ids)
            self.consumer.fail(job.params, error)
            return
        log.info("kvxfer loaded request=%s from %s: %d tokens, %d bytes, %d descriptors, %.1f ms (%s)",
                 job.req_id, ",".join(summary.peers), job.num_tokens, summary.num_bytes,
                 summary.num_descriptors, summary.seconds * 1e3, summary.mode.value)
        with self._lock:
            self._stats.record_load(num_bytes=summary.num_bytes, num_descriptors=summary.num_descriptors,
                                    seconds=summary.seconds)
            self._results.recving.add(job.req_id)
