"""The worker half of the connector (one per vLLM worker process, i.e. per TP rank).

`register` describes vLLM's cache tensors with a kvxfer layout and builds this rank's transfer
endpoint and its protocol role (kvxfer.agents.producer or .consumer, the same the daemons run):
a producer listens on its side channel and holds finished requests under leases; a consumer loads
requests from its producer ranks. Loads never run on vLLM's thread: they go to a few service
threads (several loads in flight), and their results wait for `transfer_results`, which vLLM
polls every step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kvxfer.agents import messages as m
from kvxfer.agents.capability import identity_of_peer
from kvxfer.agents.consumer import Consumer, Load
from kvxfer.agents.endpoint import DeadlinePolicy, Endpoint, Identity
from kvxfer.agents.heartbeat import LeaseClient
from kvxfer.agents.leases import Outcome
from kvxfer.agents.messages import Role
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.nixl_agent import AgentConfig, Threading
from kvxfer.agents.producer import Held, Producer
from kvxfer.agents.sidechannel import ClientCache, ClientConfig, ServerConfig
from kvxfer.agents.staged_transfer import SLOT_ALIGN, StagingConfig
from kvxfer.agents.transfer_choice import TransferChooser, TransferPlan
from kvxfer.errors import AuthError, IncompatiblePeerError, KvxferError
from kvxfer.integrations.vllm.caches import BlockMap, CacheSource, describe_vllm_caches
from kvxfer.integrations.vllm.config import ConnectorConfig, ConnectorRole, signer_of
from kvxfer.integrations.vllm.params import LoadJob, ReleaseJob, SendJob
from kvxfer.integrations.vllm.stats import KvxferStats
from kvxfer.layouts import CacheDesc
from kvxfer.planning.cost import Path

log = logging.getLogger(__name__)

_IDLE_S = 0.01  # a service thread's wait for a job
LOADS_IN_FLIGHT = 4  # service threads: a load that waits (a handshake, a push) does not hold up others


@dataclass(frozen=True)
class RankInfo:
    """Who this worker is, as vLLM's config and process group say."""

    tp_size: int
    tp_rank: int
    total_kv_heads: int
    boot_epoch: int
    cache: CacheSource  # what vLLM's config says of its caches (backend, block size, head size)
    max_model_len: int = 0  # the longest request (what a staging slot must be planned for)


@dataclass
class Results:
    """What finished since vLLM last asked."""

    sending: set[str] = field(default_factory=set)
    recving: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    failed_blocks: set[int] = field(default_factory=set)


def describe_caches(kv_caches: dict[str, torch.Tensor],
                    rank: RankInfo) -> tuple[list[torch.Tensor], CacheDesc, BlockMap]:
    """Per layer, a uint8 window over vLLM's memory from the layer's first row (what the endpoint
    registers and addresses; windows of cross-layer layouts overlap), the description they all
    share (in kernel blocks), and how vLLM's blocks split into those kernel blocks."""
    caches = describe_vllm_caches(kv_caches, rank.cache, tp_size=rank.tp_size, tp_rank=rank.tp_rank,
                                  total_kv_heads=rank.total_kv_heads)
    return caches.windows, caches.desc, caches.blocks


def check_whole_blocks(producer: m.EngineInfo, name: str, ours: CacheDesc) -> None:
    """vLLM's CPU attention kernel orders tokens inside a K or V half of a block its own way:
    whole (block, head) regions move correctly, parts of blocks do not. Measured through the
    `packed` strides: producer block_size 64 -> consumer 128 gave wrong tokens; 64 -> 64 and
    128 -> 128 gave exact ones. So vLLM CPU caches pair only at equal block sizes."""
    theirs = producer.regions[0].desc
    if ours.layout == theirs.layout == "packed" and ours.block_size != theirs.block_size:
        raise IncompatiblePeerError(name, [("caches[0].block_size", ours.block_size, theirs.block_size)])


class WorkerSide:
    def __init__(self, config: ConnectorConfig, rank: RankInfo) -> None:
        self.config = config
        self.rank = rank
        self.metrics = TransferMetrics()
        self._nixl = threading.RLock()
        self._choosing = threading.Lock()
        self._jobs: queue.Queue[LoadJob | ReleaseJob] = queue.Queue()
        self._lock = threading.Lock()
        self._results = Results()
        self._stats = KvxferStats()
        self._stop = threading.Event()
        self._role: Producer | Consumer | None = None
        self._leases: LeaseClient | None = None
        self._endpoint: Endpoint | None = None
        self._threads: list[threading.Thread] = []
        self._landing: dict[str, str] = {}  # transfer id -> vLLM request id: a failed load's READs still run
        self._pushes_may_land: list[tuple[float, str]] = []  # (until, vLLM request id): a failed direct push
        self._chooser: TransferChooser | None = None  # a consumer's: how each load moves
        self.blocks: BlockMap | None = None  # how vLLM's blocks split into kernel blocks (`register`)

    # -- setup and teardown ----------------------------------------------------------------------

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        tensors, desc, self.blocks = describe_caches(kv_caches, self.rank)
        cfg, r = self.config, self.rank
        producer = cfg.role is ConnectorRole.PRODUCER
        identity = Identity(cfg.engine_id, r.boot_epoch, Role.PREFILL if producer else Role.DECODE,
                            r.tp_size, r.tp_rank, cfg.model_fingerprint)
        threading_mode = Threading.PROGRESS_THREAD if cfg.nixl_progress_thread else Threading.APP_POLL
        agent = AgentConfig(name=f"kvxfer-{cfg.engine_id}-{r.tp_rank}-{r.boot_epoch:x}", threading=threading_mode)
        self._endpoint = Endpoint(identity, tensors, desc, agent_config=agent, metrics=self.metrics,
                                  deadline=DeadlinePolicy(cfg.transfer_deadline_s, cfg.expected_gbps),
                                  staging=self._staging(tensors[0].device))
        log.info("kvxfer %s rank %d/%d: %d layers of %s %s (%s), heads [%d, %d) of %d", cfg.role.value,
                 r.tp_rank, r.tp_size, desc.num_layers, desc.layout, desc.shape, desc.dtype,
                 desc.first_head, desc.first_head + desc.num_heads, desc.total_heads)
        self._role = self._producer(self._endpoint) if producer else self._consumer(self._endpoint)
        self._threads = [threading.Thread(target=self._serve, name=f"kvxfer-worker-{i}", daemon=True)
                         for i in range(LOADS_IN_FLIGHT)]
        for thread in self._threads:
            thread.start()

    def _staging(self, device: torch.device) -> StagingConfig | None:
        """One slot of `staging_mib` (staged pushes and the cost model's probes), or None."""
        slot_bytes = self.config.staging_bytes(device.type) // SLOT_ALIGN * SLOT_ALIGN
        if slot_bytes == 0:
            return None
        return StagingConfig(slot_bytes=slot_bytes, num_slots=1, max_tokens=self.rank.max_model_len)

    def _producer(self, endpoint: Endpoint) -> Producer:
        cfg = self.config
        role = Producer(endpoint, signer=signer_of(cfg, self.rank.boot_epoch), lease_s=cfg.lease_s,
                        metrics=self.metrics, on_release=self._sent, nixl_lock=self._nixl, shared_blocks=True,
                        grant_unbound=cfg.grants_unbound)
        role.start(ServerConfig(host=cfg.side_channel_host, port=cfg.side_channel_port + self.rank.tp_rank,
                                keys=cfg.keys, insecure=cfg.insecure, engine_id=cfg.engine_id,
                                boot_epoch=self.rank.boot_epoch))
        return role

    def _consumer(self, endpoint: Endpoint) -> Consumer:
        cfg = self.config
        clients = ClientCache(ClientConfig(keys=cfg.keys, insecure=cfg.insecure))
        self._leases = LeaseClient(clients, timeout_s=cfg.handshake_timeout_s)
        public = cfg.keys.own.public.decode() if cfg.keys is not None else None
        consumer = Consumer(endpoint, clients=clients, leases=self._leases, nixl_lock=self._nixl,
                            identity=identity_of_peer(public, cfg.engine_id),
                            handshake_timeout_s=cfg.handshake_timeout_s, request_timeout_s=cfg.handshake_timeout_s,
                            modes=cfg.mode.modes(),
                            check_producer=lambda info, name: check_whole_blocks(info, name, endpoint.region.desc))
        self._chooser = TransferChooser(consumer, mode=cfg.mode, path=cfg.transfer_path)
        return consumer

    def shutdown(self) -> None:
        """Stop serving, then release NIXL; a failure here is logged, never raised into vLLM's
        own shutdown."""
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        role = self._role
        for name, close in (("producer", isinstance(role, Producer) and role.stop),
                            ("consumer", isinstance(role, Consumer) and role.close),
                            ("endpoint", self._endpoint and self._endpoint.close)):
            try:
                if close:
                    close()
            except Exception:
                log.exception("kvxfer shutdown: closing the %s failed", name)

    # -- vLLM's thread ---------------------------------------------------------------------------

    def submit(self, sends: list[SendJob], loads: list[LoadJob], releases: list[ReleaseJob]) -> None:
        if sends and not isinstance(self._role, Producer):
            raise KvxferError("a kv_consumer got a request to hold blocks for a consumer")
        for job in sends:
            p = job.params  # kernel block ids: the scheduler signed them so (caches.py says why)
            self._role.hold(Held(p.request_id, tuple(p.block_ids), p.num_tokens, p.binding, tag=job.req_id))
            log.info("kvxfer holding request=%s (transfer %s) for %.0f s", job.req_id, p.request_id, p.lease_s)
        for item in (*loads, *releases):
            self._jobs.put(item)

    def transfer_results(self) -> Results:
        with self._lock:
            results, self._results = self._results, Results()
        if results.sending:
            self._stats.record_leases_ended(len(results.sending))
        return results

    def take_stats(self) -> KvxferStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, KvxferStats()
        return stats

    def _sent(self, held: Held, outcome: Outcome) -> None:
        """A producer lease ended: vLLM may free the request's blocks."""
        log.info("kvxfer lease of request=%s (transfer %s) ended: %s", held.tag, held.transfer_id, outcome.value)
        with self._lock:
            self._results.sending.add(str(held.tag))

    # -- service thread --------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=_IDLE_S)
            except queue.Empty:
                if isinstance(self._role, Consumer):
                    self._idle(self._role)
                continue
            try:
                if isinstance(job, ReleaseJob):
                    self._release(job)
                else:
                    self._load(job)
            except Exception:  # the thread must outlive any bug in one job
                log.exception("kvxfer service step failed")

    def _idle(self, consumer: Consumer) -> None:
        """Confirmations still leaving (without a progress thread), and failed loads whose READs
        have ended: only now may vLLM free their blocks."""
        consumer.idle()
        settled = consumer.take_settled()
        with self._lock:  # with `_failed`'s check: a load that settles before it is filed is not lost
            for transfer_id in settled:
                if transfer_id in self._landing:
                    self._results.recving.add(self._landing.pop(transfer_id))
            now = time.time()
            self._results.recving.update(req_id for until, req_id in self._pushes_may_land if until <= now)
            self._pushes_may_land = [(until, req_id) for until, req_id in self._pushes_may_land if until > now]

    def _release(self, job: ReleaseJob) -> None:
        """The producer's KV will not be read: rank 0 ends the lease on every producer rank."""
        if self.rank.tp_rank == 0 and self._leases is not None:
            self._leases.abort(job.params, reason=job.reason)

    def _kernel_ids(self, job: LoadJob) -> np.ndarray:
        """The job's blocks (vLLM's ids, which the job keeps: failures report those) as the kernel
        blocks the layout indexes, only those its tokens fill."""
        if self.blocks is None:
            raise KvxferError("a load before register_kv_caches")
        return self.blocks.kernel_ids(job.local_ids, job.num_tokens)

    def _load(self, job: LoadJob) -> None:
        consumer = self._role
        if not isinstance(consumer, Consumer):
            raise KvxferError("a kv_producer got a request to load")
        log.info("kvxfer loading request=%s: %d tokens after %d cached, from %s", job.req_id,
                 job.num_tokens, job.skip_tokens, job.params.engine_id)
        push_s = consumer.endpoint.deadline.seconds(consumer.expected_bytes(job.params, job.num_tokens))
        not_after = time.time() + consumer.request_timeout_s + push_s
        plan: TransferPlan | None = None
        try:
            local = self._kernel_ids(job)
            plan = self._plan(job)
            loaded = consumer.load(Load(job.params, local, job.num_tokens, job.skip_tokens, plan.mode, plan.staged,
                                        valid_until_ms=job.valid_until_ms, not_after_unix=not_after))
        except Exception as err:  # noqa: BLE001 (a load's failure is reported, never raised)
            # A direct push started by `not_after` writes our blocks until its own deadline.
            direct_push = plan is not None and plan.mode is m.Mode.WRITE and not plan.staged
            self._failed(job, consumer, err, push_until=not_after + push_s if direct_push else 0.0)
            return
        summary = loaded.summary
        log.info("kvxfer loaded request=%s from %s: %d tokens, %d bytes, %d descriptors, %.1f ms (%s)",
                 job.req_id, ",".join(summary.peers), job.num_tokens, summary.num_bytes,
                 summary.num_descriptors, summary.seconds * 1e3, summary.mode.value)
        with self._lock:
            self._stats.record_load(num_bytes=summary.num_bytes, num_descriptors=summary.num_descriptors,
                                    seconds=summary.seconds)
            self._results.recving.add(job.req_id)
        consumer.idle()  # its confirmations leave now, after vLLM can see the load
        with self._choosing:  # last: another load may hold it while it calibrates
            self._chooser.observe(job.params, plan, summary.seconds)

    def _plan(self, job: LoadJob) -> TransferPlan:
        """The chooser's plan; a request whose prefix this consumer had cached is READ (a push
        writes whole requests)."""
        if job.skip_tokens:
            return TransferPlan(m.Mode.READ, Path.DIRECT, "prefix cached locally")
        with self._choosing:  # once per producer epoch it handshakes and calibrates: not twice at once
            return self._chooser.plan(job.params)

    def _failed(self, job: LoadJob, consumer: Consumer, err: Exception, *, push_until: float = 0.0) -> None:
        """Report the failure to vLLM now; the request's blocks go back only once nothing can
        land in them: a READ given up still running (until it ends), a direct push the producer
        may still make (until its deadline, `push_until`: the producer's transfer cannot be
        watched from here)."""
        error = err if isinstance(err, KvxferError) else KvxferError(f"internal: {type(err).__name__}: {err}")
        error = consumer.explain(job.params, error)
        log.error("kvxfer load failed request=%s producer=%s kind=%s: %s", job.req_id,
                  job.params.engine_id, error.kind, error)
        self.metrics.observe_failure(error.kind)
        with self._lock:  # reported first: telling the producer may wait on a dead peer
            landing = consumer.landing(job.params.request_id)
            self._stats.record_failure(error.kind)
            self._results.failed.add(job.req_id)
            self._results.failed_blocks.update(job.local_ids)
            if landing:  # vLLM fails the request now and frees its blocks once it is reported done
                self._landing[job.params.request_id] = job.req_id
            elif push_until > time.time():
                self._pushes_may_land.append((push_until, job.req_id))
            else:
                self._results.recving.add(job.req_id)
        if landing:
            log.warning("kvxfer request=%s: READs given up at the failure may still land in its %d blocks; "
                        "vLLM gets them back once those end", job.req_id, len(job.local_ids))
        elif push_until > time.time():
            log.warning("kvxfer request=%s: a push the producer started in time may still land in its %d "
                        "blocks; vLLM gets them back in %.1f s", job.req_id, len(job.local_ids),
                        push_until - time.time())
        if self._leases is not None and not isinstance(error, AuthError):  # refused parameters do not
            self._leases.abort(job.params, reason=str(error), error_kind=error.kind)  # speak for a lease
