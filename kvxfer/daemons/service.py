"""Rank 0 of a prefill or decode service: starts the other ranks, builds its own, and runs every
collective command through one executor thread (the engine is single-threaded by design).

Readiness is earned, not assumed: `ready` is true only once every rank's model is loaded, its
cache is registered with NIXL, its side channel listens (prefill) and its kernels are warm;
it turns false again when a rank dies.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.pacing import IdlePacer
from kvxfer.daemons.bus import Bus
from kvxfer.daemons.commands import (
    Command,
    CountKernels,
    Described,
    Kernels,
    Reply,
    command_encoder,
    reply_decoder,
)
from kvxfer.daemons.config import ServeConfig
from kvxfer.daemons.rank_setup import RankSetup
from kvxfer.daemons.runtime import RankRuntime, build_runtime
from kvxfer.daemons.worker import worker_main
from kvxfer.engine.tokenizer import byte_level_tokenizer
from kvxfer.errors import ConfigError, KvxferError
from kvxfer.ports import ephemeral_port

log = logging.getLogger(__name__)
T = TypeVar("T")

STARTUP_TIMEOUT_S = 600.0  # model load + kernel compilation on a cold GPU node
COMMAND_SLACK_S = 30.0
KERNELS_EVERY_S = 10.0  # how often the ranks' compile counts are asked for, once ready


class ServiceMetrics:
    """Service-level metrics in the same registry as the transfer metrics of rank 0."""

    def __init__(self, transfer: TransferMetrics) -> None:
        r = transfer.registry
        self.transfer = transfer
        self.requests = Counter("kvxfer_requests", "Completion requests by outcome", ["outcome"], registry=r)
        self.request_seconds = Histogram("kvxfer_request_seconds", "Completion latency", registry=r)
        self.request_bytes = Counter("kvxfer_request_transfer_bytes", "KV bytes moved for requests, all ranks",
                                     registry=r)
        self.request_descriptors = Counter("kvxfer_request_transfer_descriptors",
                                           "Descriptors posted for requests, all ranks", registry=r)
        self.transfer_seconds = Histogram("kvxfer_request_transfer_seconds", "KV load time of a request",
                                          registry=r)
        self.blocks_in_use = Gauge("kvxfer_blocks_in_use", "Cache blocks allocated (requests and leases)",
                                   registry=r)
        self.blocks_free = Gauge("kvxfer_blocks_free", "Cache blocks free", registry=r)
        self.ready = Gauge("kvxfer_ready", "1 when every rank is up and warm", registry=r)
        self.transfer_path = Counter("kvxfer_transfer_path", "Requests by how their KV moved (cost model or "
                                     "--mode), e.g. path=staged op=write", ["path", "op"], registry=r)
        self.estimate_seconds = Gauge("kvxfer_cost_estimate_seconds", "The cost model's estimate for the last "
                                      "request, per candidate, with what that path's recent requests took "
                                      "beyond the model", ["path", "op"], registry=r)
        self.blocks_landing = Gauge("kvxfer_blocks_awaiting_late_reads", "Blocks of failed READs kept from "
                                    "the pool until no given-up READ can still land in them", registry=r)
        self.staging_free = Gauge("kvxfer_staging_slots_free", "Free staging slots on rank 0 (a failed "
                                  "staged request's slot returns only after its deadline)", registry=r)
        self.fabric = Gauge("kvxfer_fabric_cost", "Calibrated fabric costs of the last peer calibrated "
                            "(seconds, or bytes per second)", ["quantity"], registry=r)
        self.kernel_compiles = Gauge("kvxfer_kernel_compiles", "Kernels compiled (Triton, FlashInfer JIT) by "
                                     "every rank, before the service was ready and after (a request waited); "
                                     "loads from the kernel cache are not compiles", ["when"], registry=r)


class Service:
    """What prefill and decode services share: the rank group and its one executor."""

    def __init__(self, config: ServeConfig, *, log_level: str = "INFO") -> None:
        self.config = config
        self.log_level = log_level
        self.boot_epoch = time.time_ns()
        self.metrics = ServiceMetrics(TransferMetrics())
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="kvxfer-engine")
        self.bus = Bus(command_encoder, reply_decoder)
        self.runtime: RankRuntime | None = None
        self.ranks: list[Described] = []
        self.started = threading.Event()
        self.start_error: str | None = None
        self.allocator_lock = threading.Lock()
        self._stop = threading.Event()
        self._idle_thread: threading.Thread | None = None
        self._pace = IdlePacer()  # the idle thread's; `wake_idle` after work that leaves it some
        self.on_fatal: Callable[[], None] | None = None  # called once if a rank dies
        self.still_preparing: Callable[[], str] = lambda: ""  # why not ready yet once started ("" : ready)
        self._kernels_asked = 0.0  # monotonic; 0: the ranks were not told the service is ready

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Build every rank (blocking). Workers first: the TP group's init is collective."""
        began = time.monotonic()
        try:
            setup = RankSetup(self.config, 0, self.boot_epoch, f"tcp://127.0.0.1:{ephemeral_port()}")
            self.bus.spawn(worker_main, lambda r: (RankSetup(self.config, r, self.boot_epoch, setup.dist_init),
                                                   self.log_level), range(1, self.config.tp))
            self.runtime = build_runtime(setup, metrics=self.metrics.transfer, on_release=self.on_lease_end)
            workers = self.bus.gather(STARTUP_TIMEOUT_S)
            local = self.runtime.execute(_describe())
            self.ranks = [local, *workers]
            self.tokenizer = self.runtime.engine.tokenizer or \
                byte_level_tokenizer(self.runtime.engine.model_config.vocab_size)
        except KvxferError as err:
            self.start_error = str(err)
            log.error("service failed to start: %s", err)
            raise
        area = self.runtime.endpoint.staging
        if area is not None and area.pool is not None:
            self.metrics.staging_free.set_function(lambda: area.pool.num_free)
        self._idle_thread = threading.Thread(target=self._idle_loop, name="kvxfer-idle", daemon=True)
        self._idle_thread.start()
        self.started.set()
        self._update_blocks()
        log.info("%s service %s ready: TP %d, %s, %.1f s to start", self.config.role.value,
                 self.config.engine_id, self.config.tp, self.config.layout, time.monotonic() - began)

    def close(self) -> None:
        self._stop.set()
        self._pace.wake()
        self.started.clear()
        self.bus.close()
        if self.runtime is not None:
            self.runtime.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        ok = self.started.is_set() and self.bus.alive() and self.start_error is None and not self.still_preparing()
        self.metrics.ready.set(1 if ok else 0)
        return ok

    def why_not_ready(self) -> str:
        if self.start_error:
            return f"start failed: {self.start_error}"
        if not self.started.is_set():
            return "starting: loading the model, registering caches, warming kernels"
        if not self.bus.alive():
            return self.bus.out_of_step or "a rank process died"
        return self.still_preparing()

    def _idle_loop(self) -> None:
        checked = time.monotonic()
        while not self._stop.is_set():
            self._pace.sleep()
            try:
                self._pace.after(self.runtime.idle())
                self.idle_work()
            except KvxferError as err:
                log.warning("idle poll: %s", err)
            if time.monotonic() - checked > 0.5:
                checked = time.monotonic()
                self._ask_kernels()
                if not self.bus.alive():
                    dead = [pid for pid, alive in zip(self.bus.pids(), self.bus.alive_each(), strict=True) if not alive]
                    log.error("%s: the service cannot serve; exiting so that its supervisor restarts it",
                              f"rank process(es) {dead} died" if dead else self.bus.out_of_step)
                    self.metrics.ready.set(0)
                    if self.on_fatal is not None:
                        self.on_fatal()
                    return

    def idle_work(self) -> None:
        """A role's own work between requests (the idle thread; hand engine work to `executor`)."""

    def _ask_kernels(self) -> None:
        """Once ready, tell every rank (later compiles are on a request's path) and export their
        compile counts, then ask again every KERNELS_EVERY_S, between requests."""
        now = time.monotonic()
        if (self._kernels_asked and now - self._kernels_asked < KERNELS_EVERY_S) or not self.ready:
            return
        self._kernels_asked = now
        try:
            self.executor.submit(self._count_kernels)
        except RuntimeError:  # closing: the executor takes no more work
            return

    def _count_kernels(self) -> None:
        try:
            counts = [r for r in self.call(CountKernels(ready=True)) if isinstance(r, Kernels)]
        except KvxferError as err:
            log.warning("asking the ranks for their kernel compiles: %s", err)
            return
        self.metrics.kernel_compiles.labels(when="before_ready").set(sum(c.before_ready for c in counts))
        self.metrics.kernel_compiles.labels(when="after_ready").set(sum(c.after_ready for c in counts))

    # ---- commands -----------------------------------------------------------------------------

    def call(self, command: Command, *, timeout_s: float = COMMAND_SLACK_S) -> list[Reply]:
        """Run `command` on every rank (call from the executor thread)."""
        if self.runtime is None:
            raise ConfigError("service is not started")
        return self.bus.call(command, lambda: self.runtime.execute(command), timeout_s=timeout_s)

    def wake_idle(self) -> None:
        """The idle thread runs now, not at its next poll: a load's confirmations are waiting."""
        self._pace.wake()

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    # ---- blocks -------------------------------------------------------------------------------

    def allocate(self, num_tokens: int) -> list[int]:
        engine = self.runtime.engine
        with self.allocator_lock:
            ids = engine.allocator.allocate(engine.blocks_needed(num_tokens))
        self._update_blocks()
        return ids

    def free(self, ids: list[int] | tuple[int, ...]) -> None:
        with self.allocator_lock:
            self.runtime.engine.allocator.free(ids)
        self._update_blocks()

    def _update_blocks(self) -> None:
        engine = self.runtime.engine
        free = engine.allocator.num_free
        self.metrics.blocks_free.set(free)
        self.metrics.blocks_in_use.set(engine.config.cache.num_blocks - free)

    def blocks_in_use(self) -> int:
        engine = self.runtime.engine
        return engine.config.cache.num_blocks - engine.allocator.num_free

    def on_lease_end(self, held: Any, outcome: Any) -> None:
        """A lease of rank 0's producer ended (prefill frees the request's blocks)."""


def _describe():
    from kvxfer.daemons.commands import Describe

    return Describe()
