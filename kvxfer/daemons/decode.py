"""The decode service: loads a request's KV from the prefill service named in its transfer
parameters (READ: every decode rank pulls its heads; WRITE: decode allocates, prefill pushes),
tells prefill it is done, then generates.

A load that fails (prefill gone or restarted, deadline, refused handshake) ends the request with
a typed `kv_load_failed` error (HTTP 502) and frees its blocks on both sides; it never hangs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from kvxfer.agents import messages as m
from kvxfer.agents.nixl_agent import MemKind
from kvxfer.daemons import api
from kvxfer.daemons.config import Mode
from kvxfer.daemons.prefill import tokenize
from kvxfer.daemons.runtime import AwaitPush, Connect, Decode, Moved, Pull, Token
from kvxfer.daemons.service import Service
from kvxfer.errors import ConfigError, KvxferError, PeerGoneError
from kvxfer.planning import map_tp

log = logging.getLogger(__name__)
NOTIFY_TIMEOUT_S = 5.0


class LoadFailed(KvxferError):
    """The request's KV could not be loaded; `cause` is the kvxfer error kind behind it."""

    kind = "kv_load_failed"

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


class DecodeService(Service):
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
            mode = self.mode_for(params)
            if mode is Mode.READ:
                moved = self.call(Pull(params, ids))
            else:
                for rank in range(self.config.tp):
                    client.request(m.WriteRequest(request_id=params.request_id, decode_rank=rank,
                                                  block_ids=ids, decode_engine_id=self.config.engine_id,
                                                  decode_tp=self.config.tp),
                                   timeout_s=NOTIFY_TIMEOUT_S)
                moved = self.call(AwaitPush(params, self.runtime.push_timeout(params.num_tokens)))
            client.request(m.TransferDone(request_id=params.request_id, consumer_rank=0),
                           timeout_s=NOTIFY_TIMEOUT_S)
        except KvxferError as err:
            self.metrics.transfer.observe_failure(err.kind)
            self._tell_failed(client, params, err)
            raise LoadFailed(f"loading KV of {params.request_id[:8]} from {params.engine_id}: {err}",
                             err.kind) from None
        seconds = time.perf_counter() - started
        num_bytes = sum(r.num_bytes for r in moved if isinstance(r, Moved))
        descriptors = sum(r.num_descriptors for r in moved if isinstance(r, Moved))
        self.metrics.request_bytes.inc(num_bytes)
        self.metrics.request_descriptors.inc(descriptors)
        self.metrics.transfer_seconds.observe(seconds)
        return api.TransferStats(mode=mode.value, bytes=num_bytes, descriptors=descriptors,
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

    def mode_for(self, params: m.TransferParams) -> Mode:
        """READ or WRITE; `auto` pushes into GPU memory (pull over CUDA IPC falls back to a slow
        path) and pulls from host memory."""
        if self.config.mode is not Mode.AUTO:
            return self.config.mode
        return Mode.WRITE if self.runtime.endpoint.mem is MemKind.VRAM else Mode.READ

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
        try:
            stats = await self.run(lambda: self.load(params, ids))
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
            self.free(ids)
