"""The scheduler half of the connector (runs in vLLM's EngineCore process, one per instance).

It decides, per request, what the workers do, and hands that over in the step's metadata:
- consumer: a request arriving with a producer's `kv_transfer_params` is loaded asynchronously
  (`get_num_new_matched_tokens` answers "all prompt tokens not cached locally, async"), into the
  blocks vLLM allocates (`update_state_after_alloc`) -> a LoadJob. From the moment vLLM first
  shows it the request, queued or not, until the load is handed to the workers, its lease is
  renewed (kvxfer.agents.heartbeat): a request that waits longer than the lease keeps its KV.
- producer: a request sent with `do_remote_decode` keeps its blocks after it finishes
  (`request_finished` returns True) -> a SendJob with parameters signed for their consumer; the
  workers free them, through vLLM, once every consumer rank confirmed, the consumer aborted or
  the lease expired (`get_finished` on the worker side). The parameters name kernel blocks
  (vLLM's blocks split as the workers' tensors are: `learned_blocks`, caches.py says why here).
No transfer, layout or planning work happens here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvxfer.agents.heartbeat import Heartbeat, LeaseClient
from kvxfer.agents.messages import TransferParams, new_request_id
from kvxfer.agents.sidechannel import ClientCache, ClientConfig
from kvxfer.errors import ConfigError
from kvxfer.integrations.vllm.caches import BlockMap, common_block_map
from kvxfer.integrations.vllm.config import ConnectorConfig, ConnectorRole, signer_of
from kvxfer.integrations.vllm.params import (
    LoadJob,
    ReleaseJob,
    SendJob,
    binding_for,
    consumer_params,
    producer_reply,
    wants_remote_decode,
)
from kvxfer.layouts import num_blocks_for

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


def boot_epoch_of(instance_id: str) -> int:
    """One epoch per vLLM instance, the same in its scheduler and every worker (all derive it from
    the instance id vLLM draws at start), new on every restart."""
    return int(hashlib.sha256(instance_id.encode()).hexdigest()[:15], 16)


@dataclass
class StepJobs:
    """What the workers must start in the next step."""

    sends: list[SendJob] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    releases: list[ReleaseJob] = field(default_factory=list)


class SchedulerSide:
    def __init__(self, config: ConnectorConfig, *, block_size: int, tp_size: int,
                 boot_epoch: int) -> None:
        self.config = config
        self.block_size = block_size
        self.tp_size = tp_size
        self.boot_epoch = boot_epoch
        self._jobs = StepJobs()
        self._loading: set[str] = set()  # consumer requests whose load was handed to workers
        self._renewing: dict[str, str] = {}  # vLLM request id -> transfer id its heartbeat renews
        self._signer = signer_of(config, boot_epoch) if config.role is ConnectorRole.PRODUCER else None
        self._blocks: BlockMap | None = None  # the workers' kernel blocks, once they registered caches
        self._heartbeat: Heartbeat | None = None
        if config.role is ConnectorRole.CONSUMER:
            clients = ClientCache(ClientConfig(keys=config.keys, insecure=config.insecure))
            self._heartbeat = Heartbeat(LeaseClient(clients, timeout_s=config.handshake_timeout_s))

    def learned_blocks(self, per_rank: dict[int, BlockMap | None]) -> None:
        """The workers registered their caches: how they split vLLM's blocks into kernel blocks."""
        self._blocks = common_block_map(per_rank)
        log.info("kvxfer scheduler: vLLM blocks of %d are %d kernel block(s) of %d tokens", self.block_size,
                 self._blocks.blocks_per_block, self._blocks.kernel_block_size)

    # -- consumer ------------------------------------------------------------------------------

    def arrived(self, request: Request) -> None:
        """vLLM has the request, queued or not: keep its producer's lease alive from now on."""
        if self.config.role is ConnectorRole.CONSUMER and request.request_id not in self._renewing:
            params = consumer_params(request.kv_transfer_params)
            if params is not None:
                self._heartbeat.track(params)
                self._renewing[request.request_id] = params.request_id

    def loads_finished(self, req_ids: set[str]) -> None:
        """The workers loaded (or failed to load) these requests: their leases need no renewal."""
        for req_id in req_ids:
            transfer_id = self._renewing.pop(req_id, None)
            if transfer_id is not None:
                self._heartbeat.untrack(transfer_id)

    def num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if self.config.role is not ConnectorRole.CONSUMER or request.request_id in self._loading:
            return 0, False
        params = consumer_params(request.kv_transfer_params)
        if params is None:
            return 0, False
        self.arrived(request)  # vLLM versions without `on_new_request` show requests first here
        count = len(request.prompt_token_ids or ()) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if self.config.role is not ConnectorRole.CONSUMER or request.request_id in self._loading:
            return
        params = consumer_params(request.kv_transfer_params)
        if params is None:
            return
        self._loading.add(request.request_id)
        valid_until = self._heartbeat.valid_until_ms(params)
        if num_external_tokens == 0:
            self.loads_finished({request.request_id})
            self._jobs.releases.append(ReleaseJob(request.request_id, params, "prompt cached locally"))
            return
        needed = num_blocks_for(num_external_tokens, self.block_size)
        local_ids = blocks.get_unhashed_block_ids()[:needed]
        skip = len(request.prompt_token_ids or ()) - num_external_tokens
        log.info("kvxfer request=%s: loading %d tokens (%d cached) from %s", request.request_id,
                 num_external_tokens, skip, params.engine_id)
        self._jobs.loads.append(LoadJob(request.request_id, params, tuple(local_ids), skip,
                                        num_external_tokens, valid_until))

    # -- both ------------------------------------------------------------------------------------

    def finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.config.role is ConnectorRole.CONSUMER:
            self._consumer_finished(request)
            return False, None
        return self._producer_finished(request, block_ids)

    def _consumer_finished(self, request: Request) -> None:
        self.loads_finished({request.request_id})
        if request.request_id in self._loading:
            self._loading.discard(request.request_id)
            return
        params = consumer_params(request.kv_transfer_params)
        if params is not None:  # ended before it was scheduled: the producer need not wait
            self._jobs.releases.append(ReleaseJob(request.request_id, params, "request ended unscheduled"))

    def _producer_finished(self, request: Request,
                           block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        if not wants_remote_decode(request.kv_transfer_params) or not block_ids:
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted or failed: nothing to hand over
        keys = self.config.keys
        params = self._signer.sign(TransferParams(
            engine_id=self.config.engine_id,
            boot_epoch=self.boot_epoch,
            request_id=new_request_id(),
            block_ids=self._kernel_ids(block_ids, request.num_prompt_tokens),
            side_channel=self.config.side_channel_address(0),
            tp_size=self.tp_size,
            binding=binding_for(request.kv_transfer_params,
                                keys.allowed_client_keys if keys else frozenset()),
            num_tokens=request.num_prompt_tokens,
            lease_s=self.config.lease_s,
            # the workers start the lease a step later: this end is the earlier, safe one
            expires_unix_ms=int((time.time() + self.config.lease_s) * 1e3),
            producer_key=self.config.producer_key,
        ))
        self._jobs.sends.append(SendJob(request.request_id, params))
        return True, producer_reply(params)

    def _kernel_ids(self, block_ids: list[int], num_tokens: int) -> list[int]:
        """The kernel blocks holding a finished request's `num_tokens` tokens: what its consumer
        reads, at the producer layout's block size."""
        if self._blocks is None:
            raise ConfigError("KvxferConnector: the workers never reported their kernel blocks (vLLM did not "
                              "call set_xfer_handshake_metadata), so block ids cannot be translated")
        return self._blocks.kernel_ids(block_ids, num_tokens).tolist()

    def take_jobs(self) -> StepJobs:
        jobs, self._jobs = self._jobs, StepJobs()
        return jobs
