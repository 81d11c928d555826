"""The decode service: loads a request's KV from the prefill service named in its transfer
parameters (READ: every decode rank pulls its heads; WRITE: decode allocates, prefill pushes;
each decode rank talks to its own prefill ranks, kvxfer.agents.consumer), then generates.
While a request waits, its lease is renewed (`Heartbeat`).

A load that fails (prefill gone or restarted, deadline, refused handshake) ends the request with
a typed `kv_load_failed` error (HTTP 502) and frees its blocks on both sides; it never hangs. A
failed load's blocks return to the pool once nothing can land in them any more: a READ's once no
decode rank still runs one it gave up (kvxfer.daemons.landing), a push's after its deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

from kvxfer.agents import messages as m
from kvxfer.agents.heartbeat import Heartbeat
from kvxfer.agents.transfer_choice import ModeChoice, TransferChooser, TransferPlan
from kvxfer.daemons import api
from kvxfer.daemons.commands import AskLanding, Decode, Load, Moved, StillLanding, Token
from kvxfer.daemons.decode_rank import REQUEST_TIMEOUT_S
from kvxfer.daemons.landing import LandingBlocks
from kvxfer.daemons.prefill import tokenize
from kvxfer.daemons.service import Service
from kvxfer.daemons.warm import Producers
from kvxfer.errors import AuthError, ConfigError, KvxferError, LoadFailed
from kvxfer.planning import map_tp
from kvxfer.planning.cost import Choice, FabricCosts, Path

log = logging.getLogger(__name__)


class DecodeService(Service):
    def __init__(self, config, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.heartbeat: Heartbeat | None = None
        self.chooser: TransferChooser | None = None
        self.landing = LandingBlocks(ask=self._still_landing, free=self.free)
        self._shown_costs: FabricCosts | None = None  # the calibration /metrics shows
        self._estimates: dict[tuple[str, str], float] = {}  # the latest estimate of each (path, op)
        self._estimate_gauges: set[tuple[str, str]] = set()
        # Producers met before their first request (kvxfer.daemons.warm); /ready waits for them.
        self.producers = Producers(self, calibrate=None if config.mode is ModeChoice.READ else self._calibrated)
        self.still_preparing = self.producers.waiting_for

    def start(self) -> None:
        super().start()
        self.heartbeat = Heartbeat(self.runtime.leases)
        self.chooser = TransferChooser(self.runtime.consumer, mode=self.config.mode, path=self.config.transfer_path,
                                       ranks=self.config.tp)
        self.metrics.blocks_landing.set_function(lambda: self.landing.num_blocks)
        self.producers.start()

    def idle_work(self) -> None:
        if self.landing.due():
            self.executor.submit(self._check_landing)

    def _check_landing(self) -> None:
        try:
            self.landing.check()
        except KvxferError as err:
            log.warning("asking the ranks about failed READs: %s", err)

    def _calibrated(self, params: m.TransferParams) -> object:
        """Rank 0's calibration against a producer, once per boot epoch (the chooser's cache)."""
        return self.chooser.costs(params)

    def _still_landing(self, transfer_ids: list[str]) -> set[str]:
        return {t for r in self.call(AskLanding(transfer_ids)) if isinstance(r, StillLanding) for t in r.transfer_ids}

    def close(self) -> None:
        self.producers.close()
        if self.heartbeat is not None:
            self.heartbeat.close()
        super().close()

    def identity(self) -> dict:
        keys = self.runtime.keys
        return {"engine_id": self.config.engine_id, "boot_epoch": self.boot_epoch, "role": "decode",
                "tp_size": self.config.tp, "public_key": keys.own.public.decode() if keys else ""}

    def binding(self) -> m.Binding:
        keys = self.runtime.keys
        if keys is None:
            return m.Binding(consumer_engine_id=self.config.engine_id)
        return m.Binding(consumer_key=keys.own.public.decode())

    # ---- one request ----------------------------------------------------------------------------

    def prepare(self, request: api.CompletionRequest) -> tuple[m.TransferParams, list[int]]:
        params = request.kv_transfer_params
        if params is None:
            raise ConfigError("kv_transfer_params is required: a decode service generates from KV a "
                              "prefill service computed; send requests through `kvxfer proxy`")
        token_ids = tokenize(self, request.prompt)
        if params.num_tokens != len(token_ids) or params.first_token_id is None:
            raise ConfigError(f"kv_transfer_params.num_tokens={params.num_tokens} but the prompt has "
                              f"{len(token_ids)} tokens (or no first_token_id): not this prompt's KV")
        return params, token_ids

    def load(self, params: m.TransferParams, ids: list[int]) -> api.TransferStats:
        """Move the request's KV into `ids` (engine thread): every decode rank loads its share
        from its own producer ranks at once. Raises LoadFailed."""
        started = time.perf_counter()
        plan = TransferPlan(self.config.mode.fixed() or m.Mode.READ, Path.DIRECT, "")
        not_after = 0.0  # a push asked for starts by then (WRITE only: no push, no deadline)
        try:
            plan = self.plan_transfer(params)
            if plan.mode is m.Mode.WRITE:
                not_after = time.time() + self._push_start_s(params)
            moved = self.call(Load(params, ids, plan.mode, plan.path is Path.STAGED,
                                   self.heartbeat.valid_until_ms(params), not_after))
        except KvxferError as err:
            raise self._failed(params, plan, err, not_after) from None
        finally:
            self.heartbeat.untrack(params.request_id)
            self.wake_idle()
        seconds = time.perf_counter() - started
        replies = [r for r in moved if isinstance(r, Moved)]
        num_bytes = sum(r.num_bytes for r in replies)
        descriptors = sum(r.num_descriptors for r in replies)
        path = Path.STAGED if replies and all(r.staged for r in replies) else Path.DIRECT
        self.chooser.observe(params, plan, seconds)
        if plan.path is Path.STAGED and path is Path.DIRECT:
            log.info("request %s: moved directly (no staging slot on every rank)", params.request_id[:8])
        self.metrics.request_bytes.inc(num_bytes)
        self.metrics.request_descriptors.inc(descriptors)
        self.metrics.transfer_seconds.observe(seconds)
        self.metrics.transfer_path.labels(path=path.value, op=plan.mode.value).inc()
        return api.TransferStats(mode=plan.mode.value, path=path.value, bytes=num_bytes, descriptors=descriptors,
                                 transfer_ms=seconds * 1e3, gbps=num_bytes / seconds / 1e9 if seconds else 0.0,
                                 peers=len(map_tp(self.runtime.engine.model_config.num_kv_heads, params.tp_size,
                                                  self.config.tp).assignments))

    def _push_start_s(self, params: m.TransferParams) -> float:
        """How long producers may take to start a push: a decode rank waits for a staging slot up
        to its deadline, then asks (one notification per producer rank, which a producer stalled
        or busy with other pushes reads late)."""
        per_rank = self.runtime.consumer.expected_bytes(params, params.num_tokens)
        return self.runtime.endpoint.deadline.seconds(per_rank) + REQUEST_TIMEOUT_S

    def _failed(self, params: m.TransferParams, plan: TransferPlan, err: KvxferError, not_after: float) -> LoadFailed:
        """The typed error of a failed load, after telling every producer rank to end the lease.
        A WRITE's blocks stay out of the pool until no push started in time can land."""
        err = self.runtime.consumer.explain(params, err)
        self.metrics.transfer.observe_failure(err.kind)
        if not isinstance(err, AuthError):  # refused parameters do not speak for the lease they name
            self.runtime.leases.abort(params, reason=str(err), error_kind=err.kind)
        quarantine = 0.0
        if plan.mode is m.Mode.WRITE:
            push_s = self.runtime.endpoint.deadline.seconds(self.runtime.consumer.expected_bytes(params, params.num_tokens))
            quarantine = max(0.0, not_after + push_s - time.time())
        return LoadFailed(f"loading KV of {params.request_id[:8]} from {params.engine_id}: {err}", err.kind, quarantine,
                          reads_may_land=plan.mode is m.Mode.READ and not isinstance(err, AuthError))

    def plan_transfer(self, params: m.TransferParams) -> TransferPlan:
        """How this request's KV moves (kvxfer.agents.transfer_choice; rank 0 decides for every
        decode rank), with the cost model's figures in /metrics (read when scraped: a request
        only keeps its choice)."""
        plan = self.chooser.plan(params)
        if plan.choice is not None:
            self._show_costs(self.chooser.costs(params), plan.choice)
        return plan

    def _show_costs(self, costs: FabricCosts | None, choice: Choice) -> None:
        if costs is not None and costs is not self._shown_costs:  # a new calibration: once per producer epoch
            self._shown_costs = costs
            for name, value in asdict(costs).items():
                self.metrics.fabric.labels(quantity=name).set(value)
        self._estimates.update({(c.path.value, "write" if c.write else "read"): c.seconds for c in choice.candidates})
        for key in self._estimates.keys() - self._estimate_gauges:
            self._estimate_gauges.add(key)
            self.metrics.estimate_seconds.labels(path=key[0], op=key[1]).set_function(
                lambda key=key: self._estimates[key])

    async def generate(self, request: api.CompletionRequest) -> AsyncIterator[tuple[int, api.TransferStats | None]]:
        """Yields (token, stats-once-at-start). Frees the request's blocks when done or cancelled."""
        params, token_ids = self.prepare(request)
        num_cached = len(token_ids)
        ids = self.allocate(num_cached + request.max_tokens)
        failure: LoadFailed | None = None
        self.heartbeat.track(params)  # from arrival: a request queued behind others keeps its lease
        try:
            try:
                stats = await self.run(lambda: self.load(params, ids))
            except LoadFailed as err:
                failure = err
                raise
            token = params.first_token_id
            yield token, stats
            for step in range(1, request.max_tokens):
                command = Decode(token, ids, num_cached + step - 1, request.temperature, request.seed or 0)
                reply = (await self.run(lambda c=command: self.call(c)))[0]
                if not isinstance(reply, Token):
                    raise ConfigError(f"decode answered {type(reply).__name__}")
                token = reply.token
                yield token, None
        finally:
            self.heartbeat.untrack(params.request_id)
            self._give_back(ids, params.request_id, failure)

    def _give_back(self, ids: list[int], request_id: str, failure: LoadFailed | None) -> None:
        """A request's blocks back to the pool: now, or once nothing that failed can land in them."""
        if failure is not None and failure.reads_may_land:
            self.landing.keep(request_id, ids)
            self.wake_idle()
        elif failure is not None and failure.quarantine_s > 0:
            self._free_later(ids, failure.quarantine_s, request_id)
        else:
            self.free(ids)

    def _free_later(self, ids: list[int], delay_s: float, request_id: str) -> None:
        """A failed WRITE's blocks go back once no push the producer started in time can land."""
        log.info("request %s failed after asking for a push: its %d blocks return in %.1f s", request_id[:8],
                 len(ids), delay_s)
        timer = threading.Timer(delay_s, self.free, args=(ids,))
        timer.daemon = True
        timer.start()
