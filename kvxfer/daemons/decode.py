"""The decode service: loads a request's KV from the prefill service named in its transfer
parameters (READ: every decode rank pulls its heads; WRITE: decode allocates, prefill pushes),
tells prefill it is done, then generates.

A load that fails (prefill gone or restarted, deadline, refused handshake) ends the request with
a typed `kv_load_failed` error (HTTP 502) and frees its blocks on both sides; it never hangs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from kvxfer.agents import messages as m
from kvxfer.agents.nixl_agent import MemKind
from kvxfer.daemons import api
from kvxfer.daemons.commands import (
    AwaitPush,
    Connect,
    Decode,
    Moved,
    Pull,
    Reserve,
    Reserved,
    Token,
    Unreserve,
)
from kvxfer.daemons.config import Mode, TransferPath
from kvxfer.daemons.prefill import tokenize
from kvxfer.daemons.service import Service
from kvxfer.errors import ConfigError, KvxferError, LoadFailed, PeerGoneError, TransferTimeout
from kvxfer.planning import map_tp
from kvxfer.planning.cost import Path, choose

log = logging.getLogger(__name__)
NOTIFY_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TransferPlan:
    mode: Mode  # READ or WRITE
    path: Path  # direct (one descriptor per span) or staged (gather, one descriptor, scatter)
    why: str  # for the log: the cost model's candidates, the rule, or the flag


class DecodeService(Service):
    def __init__(self, config, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self._announced: dict[tuple[str, int], tuple[Mode, Path]] = {}
        self._push_until: dict[str, float] = {}  # request id -> wall clock a push may still land by

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
        """Move the request's KV into `ids` (engine thread). Raises LoadFailed."""
        started = time.perf_counter()
        client = self.runtime.client_for(params.side_channel)
        try:
            self.check_alive(client, params)
            client.request(m.Claim(request_id=params.request_id, block_ids=params.block_ids,
                                   num_tokens=params.num_tokens, tp_size=params.tp_size),
                           timeout_s=NOTIFY_TIMEOUT_S)
            self.call(Connect(params))
            plan = self.plan_transfer(params)
            if plan.mode is Mode.READ:
                moved = self.call(Pull(params, ids))
            else:
                offsets = self._reserve(params, ids) if plan.path is Path.STAGED else None
                if plan.path is Path.STAGED and offsets is None:
                    plan = TransferPlan(Mode.WRITE, Path.DIRECT, "no free staging slot on every rank")
                moved = self._pushed(client, params, ids, offsets)
            client.request(m.TransferDone(request_id=params.request_id, consumer_rank=0),
                           timeout_s=NOTIFY_TIMEOUT_S)
        except KvxferError as err:
            self.metrics.transfer.observe_failure(err.kind)
            self._tell_failed(client, params, err)
            until = self._push_until.pop(params.request_id, 0.0)
            raise LoadFailed(f"loading KV of {params.request_id[:8]} from {params.engine_id}: {err}",
                             err.kind, max(0.0, until - time.time())) from None
        self._push_until.pop(params.request_id, None)
        seconds = time.perf_counter() - started
        num_bytes = sum(r.num_bytes for r in moved if isinstance(r, Moved))
        descriptors = sum(r.num_descriptors for r in moved if isinstance(r, Moved))
        self.metrics.request_bytes.inc(num_bytes)
        self.metrics.request_descriptors.inc(descriptors)
        self.metrics.transfer_seconds.observe(seconds)
        self.metrics.transfer_path.labels(path=plan.path.value, op=plan.mode.value).inc()
        return api.TransferStats(mode=plan.mode.value, path=plan.path.value, bytes=num_bytes, descriptors=descriptors,
                                 transfer_ms=seconds * 1e3, gbps=num_bytes / seconds / 1e9 if seconds else 0.0,
                                 peers=len(map_tp(self.runtime.engine.model_config.num_kv_heads, params.tp_size,
                                                   self.config.tp).assignments))

    def check_alive(self, client, params: m.TransferParams) -> None:
        """One round trip to prefill rank 0: a restarted prefill (new boot epoch) lost the KV these
        parameters point to, so say so now instead of reading through a stale agent."""
        pong = client.request(m.Ping(), timeout_s=NOTIFY_TIMEOUT_S)
        if not isinstance(pong, m.Pong):
            raise PeerGoneError(f"prefill {params.engine_id} answered {type(pong).__name__} to a ping")
        if (pong.engine_id, pong.boot_epoch) != (params.engine_id, params.boot_epoch):
            raise PeerGoneError(
                f"prefill {params.engine_id} at epoch {params.boot_epoch} is gone: "
                f"{params.side_channel} is now {pong.engine_id} at epoch {pong.boot_epoch} (restarted; the "
                f"request's KV was lost with it)")

    def plan_transfer(self, params: m.TransferParams) -> TransferPlan:
        """How this request's KV moves. With costs calibrated against the producer (at its first
        handshake), the cost model picks the cheapest of what `--mode` and staging allow; without
        them a rule: `auto` pushes into GPU memory (pull over CUDA IPC falls back to a slow path)
        and pulls from host memory, staged where both sides have slots and the memory is VRAM."""
        runtime = self.runtime
        if self.config.mode is Mode.READ:
            return TransferPlan(Mode.READ, Path.DIRECT, "--mode read")
        stage = self.config.transfer_path is not TransferPath.DIRECT and runtime.can_stage(params)
        if self.config.transfer_path is TransferPath.STAGED:
            path = Path.STAGED if stage else Path.DIRECT
            return self._announce(params, TransferPlan(Mode.WRITE, path, "--transfer-path staged"
                                                       + ("" if stage else " (does not fit a slot: direct)")))
        costs = runtime.costs.get((params.engine_id, params.boot_epoch))
        if costs is None:
            vram = runtime.endpoint.mem is MemKind.VRAM
            mode = Mode.WRITE if self.config.mode is Mode.WRITE or vram else Mode.READ
            path = Path.STAGED if mode is Mode.WRITE and stage and vram else Path.DIRECT
            return self._announce(params, TransferPlan(mode, path, "rule (no calibration)"))
        for name, value in asdict(costs).items():
            self.metrics.fabric.labels(quantity=name).set(value)
        allowed = [(Path.DIRECT, True)] + ([(Path.STAGED, True)] if stage else [])
        if self.config.mode is Mode.AUTO:
            allowed.append((Path.DIRECT, False))
        choice = choose(costs, num_bytes=runtime.expected_bytes(params) * self.config.tp,
                        descriptors=runtime.direct_descriptors(params), allowed=tuple(allowed))
        for c in choice.candidates:
            self.metrics.estimate_seconds.labels(path=c.path.value, op="write" if c.write else "read").set(c.seconds)
        best = choice.best
        return self._announce(params, TransferPlan(Mode.WRITE if best.write else Mode.READ, best.path,
                                                   f"cost model: {choice.describe()}"))

    def _announce(self, params: m.TransferParams, plan: TransferPlan) -> TransferPlan:
        """Log the first choice for each producer epoch and each change of choice (INFO), every
        request's at DEBUG: a reader of the log sees why transfers take the path they take."""
        key = (params.engine_id, params.boot_epoch)
        if self._announced.get(key) != (plan.mode, plan.path):
            self._announced[key] = (plan.mode, plan.path)
            log.info("transfers from %s (epoch %d): %s %s, by %s", params.engine_id, params.boot_epoch,
                     plan.path.value, plan.mode.value, plan.why)
        else:
            log.debug("request %s: %s %s, by %s", params.request_id[:8], plan.path.value, plan.mode.value, plan.why)
        return plan

    def _reserve(self, params: m.TransferParams, ids: list[int]) -> list[list[int]] | None:
        """Every decode rank's staging offsets (per source), or None (and nothing held) when a
        rank cannot stage the request now (no slot freed in time: back-pressure, then direct)."""
        try:
            replies = self.call(Reserve(params, ids))
        except KvxferError as err:  # a rank failed; the others may hold a slot
            self._unreserve(params.request_id, 0.0)
            if isinstance(err, TransferTimeout):
                log.info("request %s: no staging slot freed in time (%s): moving it directly",
                         params.request_id[:8], err)
                return None
            raise
        offsets = [r.offsets for r in replies if isinstance(r, Reserved)]
        if len(offsets) == len(replies) and all(offsets):
            return offsets
        self._unreserve(params.request_id, 0.0)
        return None

    def _unreserve(self, request_id: str, delay_s: float) -> None:
        """Give every rank's staging slot back (after `delay_s`). Called while another error is
        on its way: a rank that cannot answer is logged, not allowed to replace that error."""
        try:
            self.call(Unreserve(request_id, delay_s))
        except KvxferError as err:
            log.warning("request %s: giving staging slots back failed: %s", request_id[:8], err)

    def _pushed(self, client, params: m.TransferParams, ids: list[int], offsets: list[list[int]] | None) -> list:
        """WRITE: ask the producer to push into every decode rank (its blocks, or its staging
        slot), then wait for all of it. A staged request that fails keeps its slots away from
        other requests until no late write can land in them."""
        timeout_s = self.runtime.push_timeout(params.num_tokens)
        not_after = time.time() + NOTIFY_TIMEOUT_S * self.config.tp + timeout_s
        # A push that starts by not_after ends within its own deadline: until then a failed
        # request's blocks (direct) or staging slot (staged) stay out of the pool.
        if offsets is None:
            self._push_until[params.request_id] = not_after + timeout_s
        try:
            for rank in range(self.config.tp):
                client.request(m.WriteRequest(request_id=params.request_id, decode_rank=rank,
                                              block_ids=ids, decode_engine_id=self.config.engine_id,
                                              decode_tp=self.config.tp,
                                              staging_offsets=offsets[rank] if offsets else None,
                                              not_after_unix=not_after),
                               timeout_s=NOTIFY_TIMEOUT_S)
            return self.call(AwaitPush(params, timeout_s, staged=offsets is not None))
        except KvxferError:
            if offsets is not None:
                self._unreserve(params.request_id, max(0.0, not_after + timeout_s - time.time()))
            raise

    def _tell_failed(self, client, params: m.TransferParams, err: KvxferError) -> None:
        """Best effort: let prefill free the request's blocks now instead of at lease expiry."""
        try:
            client.request(m.TransferDone(request_id=params.request_id, consumer_rank=0, status=m.Status.ERROR,
                                          error_kind=err.kind, error_message=str(err)[:4000]),
                           timeout_s=1.0)
        except KvxferError as notify_err:
            log.info("could not tell prefill that %s failed: %s", params.request_id[:8], notify_err)

    async def generate(self, request: api.CompletionRequest) -> AsyncIterator[tuple[int, api.TransferStats | None]]:
        """Yields (token, stats-once-at-start). Frees the request's blocks when done or cancelled."""
        params, token_ids = self.prepare(request)
        num_cached = len(token_ids)
        ids = self.allocate(num_cached + request.max_tokens)
        quarantine_s = 0.0
        try:
            try:
                stats = await self.run(lambda: self.load(params, ids))
            except LoadFailed as err:
                quarantine_s = err.quarantine_s
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
            if quarantine_s > 0:
                self._free_later(ids, quarantine_s, params.request_id)
            else:
                self.free(ids)

    def _free_later(self, ids: list[int], delay_s: float, request_id: str) -> None:
        """A failed WRITE's blocks go back once no push the producer started in time can land."""
        log.info("request %s failed after asking for a push: its %d blocks return in %.1f s", request_id[:8],
                 len(ids), delay_s)
        timer = threading.Timer(delay_s, self.free, args=(ids,))
        timer.daemon = True
        timer.start()
