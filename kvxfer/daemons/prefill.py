"""The prefill service: computes a prompt's KV, and hands out the signed transfer parameters a
decode service needs to fetch it.

Every prefill rank holds the request under its own lease (kvxfer.agents.producer); the lease ends
when every decode rank confirmed, the consumer aborted, or it stopped renewing. Rank 0 allocates
every rank's blocks, so its lease's end frees them.
"""

from __future__ import annotations

import logging

from kvxfer.agents import messages as m
from kvxfer.agents.leases import Outcome
from kvxfer.agents.producer import Held
from kvxfer.daemons import api
from kvxfer.daemons.commands import Prefill, Token
from kvxfer.daemons.service import Service
from kvxfer.errors import ConfigError

log = logging.getLogger(__name__)


class PrefillService(Service):
    async def complete(self, request: api.CompletionRequest) -> api.CompletionResponse:
        token_ids = tokenize(self, request.prompt)
        ids = self.allocate(len(token_ids))
        transfer_id = m.new_request_id()
        binding = request.kvxfer_consumer or m.Binding()
        command = Prefill(token_ids, ids, transfer_id, binding, request.temperature, request.seed or 0)
        try:
            reply = await self.run(lambda: self.call(command)[0])
        except BaseException:
            self._give_back(transfer_id, ids)
            raise
        if not isinstance(reply, Token):
            self._give_back(transfer_id, ids)
            raise ConfigError(f"prefill answered {type(reply).__name__}")
        params = self.runtime.producer.sign(m.TransferParams(
            engine_id=self.config.engine_id, boot_epoch=self.boot_epoch, request_id=transfer_id,
            block_ids=ids, side_channel=self.ranks[0].side_channel, tp_size=self.config.tp,
            binding=binding, num_tokens=len(token_ids), first_token_id=reply.token,
            lease_s=self.config.lease_s, expires_unix_ms=reply.expires_unix_ms))
        return api.CompletionResponse(
            id=api.completion_id(transfer_id), model=request.model,
            choices=[api.Choice(text=self.tokenizer.decode([reply.token]), token_ids=[reply.token],
                                finish_reason="length")],
            usage=api.Usage(prompt_tokens=len(token_ids), completion_tokens=1,
                            total_tokens=len(token_ids) + 1),
            kv_transfer_params=params)

    def _give_back(self, transfer_id: str, ids: list[int]) -> None:
        """A failed prefill's blocks: through rank 0's lease if it took one (its end frees
        them, once), else now. Other ranks' leases hold no blocks and expire."""
        if not self.runtime.producer.drop(transfer_id, "prefill failed"):
            self.free(ids)

    def on_lease_end(self, held: Held, outcome: Outcome) -> None:
        if outcome is Outcome.EXPIRED:
            log.info("lease of %s expired: freeing %d blocks", held.transfer_id[:8], len(held.block_ids))
        self.free(list(held.block_ids))


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
