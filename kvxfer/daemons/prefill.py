"""The prefill service: computes a prompt's KV, holds its blocks under a lease, and hands out the
transfer parameters a decode service needs to fetch them.

Leases live on rank 0 (it allocates every rank's blocks). They end when the bound consumer says
it is done (`TransferDone`), aborts, or stops renewing; only then are the blocks freed. In WRITE
mode the consumer asks (`WriteRequest`) and every prefill rank pushes its heads to the decode
ranks the TP mapping pairs it with.
"""

from __future__ import annotations

import logging
import threading
import time

from kvxfer.agents import messages as m
from kvxfer.agents.leases import LeaseTable
from kvxfer.agents.sidechannel import PeerInfo, check_binding
from kvxfer.daemons import api
from kvxfer.daemons.commands import Prefill, Push, Token
from kvxfer.daemons.service import Service
from kvxfer.errors import ConfigError, KvxferError, LeaseError, PlanError

log = logging.getLogger(__name__)
CONSUMER = "consumer"  # one consumer per request: the decode service (its rank 0 speaks for it)


class PrefillService(Service):
    def __init__(self, config, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.leases = LeaseTable(ttl_s=config.lease_s, metrics=self.metrics.transfer)
        self.lease_lock = threading.Lock()
        self._bindings: dict[str, m.Binding] = {}
        self._requests: dict[str, tuple[list[int], int]] = {}  # request id -> (blocks, num tokens)

    def start(self) -> None:
        super().start()
        threading.Thread(target=self._expire_loop, name="kvxfer-leases", daemon=True).start()

    # ---- HTTP -----------------------------------------------------------------------------------

    async def complete(self, request: api.CompletionRequest) -> api.CompletionResponse:
        token_ids = tokenize(self, request.prompt)
        ids = self.allocate(len(token_ids))
        try:
            reply = await self.run(lambda: self.call(Prefill(token_ids, ids, request.temperature,
                                                             request.seed or 0))[0])
        except BaseException:
            self.free(ids)
            raise
        if not isinstance(reply, Token):
            self.free(ids)
            raise ConfigError(f"prefill answered {type(reply).__name__}")
        request_id = m.new_request_id()
        binding = request.kvxfer_consumer or m.Binding()
        with self.lease_lock:
            self.leases.acquire(request_id, ids, [CONSUMER], now=time.monotonic())
            self._bindings[request_id] = binding
            self._requests[request_id] = (ids, len(token_ids))
        params = m.TransferParams(
            engine_id=self.config.engine_id, boot_epoch=self.boot_epoch, request_id=request_id,
            block_ids=ids, side_channel=self.ranks[0].side_channel, tp_size=self.config.tp,
            binding=binding, num_tokens=len(token_ids), first_token_id=reply.token,
            lease_expires_s=self.config.lease_s)
        return api.CompletionResponse(
            id=api.completion_id(request_id), model=request.model,
            choices=[api.Choice(text=self.tokenizer.decode([reply.token]), token_ids=[reply.token],
                                finish_reason="length")],
            usage=api.Usage(prompt_tokens=len(token_ids), completion_tokens=1,
                            total_tokens=len(token_ids) + 1),
            kv_transfer_params=params)

    # ---- side channel (rank 0) --------------------------------------------------------------

    def handle_service_message(self, peer: PeerInfo, msg: m.Message) -> m.Message | None:
        match msg:
            case m.TransferDone():
                self._end(peer, msg.request_id, aborted=msg.status is not m.Status.OK)
                return m.Ack(request_id=msg.request_id)
            case m.Abort():
                self._end(peer, msg.request_id, aborted=True)
                return m.Ack(request_id=msg.request_id)
            case m.LeaseRenew():
                return self._renew(peer, msg)
            case m.WriteRequest():
                self._push(peer, msg)
                return m.Ack(request_id=msg.request_id)
            case m.Claim():
                self._claim(peer, msg)
                return m.Ack(request_id=msg.request_id)
        return None

    def _checked(self, peer: PeerInfo, request_id: str) -> None:
        with self.lease_lock:
            binding = self._bindings.get(request_id)
        if binding is None:
            raise LeaseError(f"request {request_id}: no lease held (never granted, done, aborted or expired)")
        if peer.public_key is None:
            return  # --insecure-plaintext: no authenticated identity to bind to (docs/security.md)
        check_binding(peer, binding)

    def _end(self, peer: PeerInfo, request_id: str, *, aborted: bool) -> None:
        self._checked(peer, request_id)
        with self.lease_lock:
            released = self.leases.abort(request_id) if aborted else \
                self.leases.confirm(request_id, CONSUMER, now=time.monotonic())
        if released is not None:
            self._release(released.request_id, released.blocks)

    def _claim(self, peer: PeerInfo, msg: m.Claim) -> None:
        """Refuse parameters that do not match the lease: forged or stale block lists."""
        self._checked(peer, msg.request_id)
        with self.lease_lock:
            blocks, num_tokens = self._requests[msg.request_id]
        if list(msg.block_ids) != list(blocks) or msg.num_tokens != num_tokens:
            self.metrics.transfer.observe_failure("plan")
            raise PlanError(f"request {msg.request_id}: parameters name blocks {list(msg.block_ids)[:8]} "
                            f"and {msg.num_tokens} tokens, but its lease holds {list(blocks)[:8]} and "
                            f"{num_tokens} tokens; refusing")
        if msg.tp_size is not None and msg.tp_size != self.config.tp:
            self.metrics.transfer.observe_failure("plan")
            raise PlanError(f"request {msg.request_id}: parameters name prefill TP size {msg.tp_size}, "
                            f"but this service runs at TP {self.config.tp}; refusing")

    def _renew(self, peer: PeerInfo, msg: m.LeaseRenew) -> m.Message:
        renewed, unknown = [], []
        for rid in msg.request_ids:
            try:
                self._checked(peer, rid)
                with self.lease_lock:
                    self.leases.renew(rid, CONSUMER, now=time.monotonic())
                renewed.append(rid)
            except LeaseError:
                unknown.append(rid)
        return m.LeaseRenewed(renewed=renewed, unknown=tuple(unknown))

    def _push(self, peer: PeerInfo, msg: m.WriteRequest) -> None:
        self._checked(peer, msg.request_id)
        with self.lease_lock:
            blocks, num_tokens = self._requests[msg.request_id]
        push = Push(request_id=msg.request_id, decode_engine_id=msg.decode_engine_id,
                    decode_rank=msg.decode_rank, decode_block_ids=list(msg.block_ids),
                    block_ids=list(blocks), num_tokens=num_tokens, decode_tp=msg.decode_tp,
                    staging_offsets=list(msg.staging_offsets) if msg.staging_offsets is not None else None,
                    requester_key=peer.public_key, not_after_unix=msg.not_after_unix)

        def run() -> None:
            try:
                self.call(push)
            except KvxferError as err:  # the consumer's deadline reports it on the decode side
                log.warning("push of %s to decode rank %d failed: %s", msg.request_id[:8], msg.decode_rank, err)
                self.metrics.transfer.observe_failure(err.kind)

        self.executor.submit(run)

    def _release(self, request_id: str, blocks: tuple[int, ...]) -> None:
        with self.lease_lock:
            self._bindings.pop(request_id, None)
            self._requests.pop(request_id, None)
        self.free(list(blocks))

    def _expire_loop(self) -> None:
        while not self._stop.wait(0.2):
            with self.lease_lock:
                expired = self.leases.expire(time.monotonic())
            for released in expired:
                log.info("lease of %s expired: freeing %d blocks", released.request_id[:8], len(released.blocks))
                self._release(released.request_id, released.blocks)


def tokenize(service: Service, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = service.tokenizer.encode(prompt).ids
        if not ids:
            raise ConfigError("prompt encodes to no tokens")
        return list(ids)
    vocab = service.runtime.engine.model_config.vocab_size
    bad = [t for t in prompt if t >= vocab]
    if bad:
        raise ConfigError(f"prompt token id {bad[0]} outside the vocabulary [0, {vocab})")
    return list(prompt)



