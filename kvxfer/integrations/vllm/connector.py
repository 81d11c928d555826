"""`KvxferConnector`: vLLM's KVConnectorBase_V1 implemented by kvxfer.

vLLM builds one instance per process: role SCHEDULER in the EngineCore process, role WORKER in
each worker. Each method forwards to the half that owns the work (`SchedulerSide`, `WorkerSide`);
this module only translates between vLLM's objects and those halves, and refuses setups the
connector does not support with a ConfigError that says which setting and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1 import base as vllm_base
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvxfer.errors import ConfigError
from kvxfer.integrations.vllm.caches import BlockMap, CacheSource, required_layout
from kvxfer.integrations.vllm.config import ConnectorConfig, model_fingerprint, parse_config
from kvxfer.integrations.vllm.params import LoadJob, ReleaseJob, SendJob
from kvxfer.integrations.vllm.scheduler import SchedulerSide, boot_epoch_of
from kvxfer.integrations.vllm.stats import KvxferStats
from kvxfer.integrations.vllm.worker import RankInfo, Results, WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


def _log_like_vllm() -> None:
    """kvxfer's log lines in vLLM's processes: vLLM configures only its own logger, so without
    this our INFO lines (registration, leases) would be dropped. The plugin is kvxfer's entry
    point in those processes, as the CLI is in kvxfer's own."""
    root = logging.getLogger("kvxfer")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


_log_like_vllm()


@dataclass
class KvxferMetadata(KVConnectorMetadata):
    """One step's jobs, scheduler -> workers."""

    sends: list[SendJob] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    releases: list[ReleaseJob] = field(default_factory=list)
    submitted: bool = False  # set by the worker that handed the jobs over (once per step)


@dataclass(frozen=True)
class WorkerBlocks(KVConnectorHandshakeMetadata):
    """One worker -> the scheduler, once, after it registered its caches: how its tensors split
    vLLM's blocks. The producer's scheduler signs kernel block ids with it (caches.py says why)."""

    blocks: BlockMap


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
    """Refuse what the connector cannot transfer correctly, naming the setting."""
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        raise ConfigError(f"KvxferConnector: pipeline parallelism is not supported "
                          f"(pipeline_parallel_size={par.pipeline_parallel_size}); use tensor parallelism")
    for kind in ("decode", "prefill"):  # a rank's cache then holds every n-th token of a block
        size = getattr(par, f"{kind}_context_parallel_size", 1)
        if size > 1:
            raise ConfigError(f"KvxferConnector: {kind} context parallelism is not supported "
                              f"({kind}_context_parallel_size={size}); use tensor parallelism")
    if par.data_parallel_size > 1:
        raise ConfigError(f"KvxferConnector: data parallelism inside one instance is not supported "
                          f"(data_parallel_size={par.data_parallel_size}); run one instance per replica")
    if vllm_config.model_config.use_mla:
        raise ConfigError("KvxferConnector: MLA models are not supported yet: their caches are described "
                          "(kvxfer.integrations.vllm.caches) and move correctly between processes, but no "
                          "vLLM run with an MLA model has been tested")
    groups = kv_cache_config.kv_cache_groups
    kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
    if len(groups) != 1 or kinds != ["FullAttentionSpec"]:
        raise ConfigError(f"KvxferConnector: hybrid models are not supported: {len(groups)} KV cache "
                          f"group(s) of {kinds} (one group of full attention is; sliding-window models "
                          f"work with the hybrid KV cache manager off, Mamba/SSM layers do not)")


def fingerprint_of(vllm_config: VllmConfig) -> str:
    """What two instances must share for their caches to be interchangeable."""
    model = vllm_config.model_config
    hf = model.hf_text_config
    arch = (getattr(model.hf_config, "architectures", None) or ["unknown"])[0]
    return model_fingerprint(arch, {
        "num_layers": hf.num_hidden_layers,
        "num_kv_heads": model.get_total_num_kv_heads(),
        "head_size": model.get_head_size(),
        "hidden_size": hf.hidden_size,
        "vocab_size": hf.vocab_size,
        "dtype": str(model.dtype),
        "cache_dtype": vllm_config.cache_config.cache_dtype,
    })


def cache_source_of(vllm_config: VllmConfig) -> CacheSource:
    """What the worker needs besides vLLM's tensors to describe them; refuses, at start-up, a
    backend kvxfer does not read and models whose layers use several backends."""
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

    names = sorted({backend.get_name() for backend in get_current_attn_backends(vllm_config)})
    if len(names) != 1:
        raise ConfigError(f"KvxferConnector: layers use attention backends {names}; one backend for every "
                          f"layer is supported")
    model = vllm_config.model_config
    return CacheSource(backend=names[0], block_size=vllm_config.cache_config.block_size,
                       head_size=model.get_head_size(), use_mla=model.use_mla)


class KvxferConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        check_supported(vllm_config, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        config: ConnectorConfig = parse_config(
            dict(transfer.kv_connector_extra_config or {}), role=transfer.kv_role,
            engine_id=str(transfer.engine_id), default_fingerprint=fingerprint_of(vllm_config))
        epoch = boot_epoch_of(vllm_config.instance_id)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._load_errors: set[int] = set()
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        if role is KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(config, block_size=vllm_config.cache_config.block_size,
                                            tp_size=tp_size, boot_epoch=epoch)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._worker = WorkerSide(config, RankInfo(
                tp_size=tp_size, tp_rank=get_tensor_model_parallel_rank(),
                total_kv_heads=vllm_config.model_config.get_total_num_kv_heads(),
                boot_epoch=epoch, cache=cache_source_of(vllm_config),
                max_model_len=vllm_config.model_config.max_model_len))

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """The cache layout kvxfer asks vLLM for (VLLM_KV_CACHE_LAYOUT still wins): head-major, so
        a decode rank's heads of a block are one span whatever the two TP sizes."""
        model = vllm_config.model_config
        return None if model is None else required_layout(use_mla=model.use_mla)

    # -- scheduler side --------------------------------------------------------------------------

    def _sched(self) -> SchedulerSide:
        if self._scheduler is None:
            raise ConfigError("KvxferConnector: scheduler method called on a worker instance")
        return self._scheduler

    def on_new_request(self, request: Request) -> None:
        self._sched().arrived(request)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._sched().loads_finished(set(connector_output.finished_recving or ()))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        return self._sched().num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        self._sched().after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        jobs = self._sched().take_jobs()
        return KvxferMetadata(sends=jobs.sends, loads=jobs.loads, releases=jobs.releases)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().finished(request, block_ids)

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        """vLLM hands over what each worker's `get_handshake_metadata` said, by TP rank, before
        the first request."""
        per_rank = {rank: meta.blocks if isinstance(meta, WorkerBlocks) else None for rank, meta in metadata.items()}
        self._sched().learned_blocks(per_rank)

    # -- worker side -----------------------------------------------------------------------------

    def _work(self) -> WorkerSide:
        if self._worker is None:
            raise ConfigError("KvxferConnector: worker method called on the scheduler instance")
        return self._worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._work().register(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        blocks = self._work().blocks
        return None if blocks is None else WorkerBlocks(blocks)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Hand this step's jobs to the service thread; loads run there, between steps (vLLM keeps
        the loading requests out of the batch until `get_transfer_results` reports them)."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvxferMetadata) or meta.submitted:
            return
        meta.submitted = True
        self._work().submit(meta.sends, meta.loads, meta.releases)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole requests, finished before the request is scheduled

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # consumers read (or producers write) vLLM's own cache: nothing to copy out

    def wait_for_save(self) -> None:
        return

    def _transfer_results(self) -> Results:
        results = self._work().transfer_results()
        self._load_errors = results.failed_blocks
        return results

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """vLLM >= 0.32's report of what finished; older vLLMs (0.25) call `get_finished`."""
        results = self._transfer_results()
        return vllm_base.KVConnectorTransferResults(finished_sending=results.sending,
                                                    finished_recving=results.recving,
                                                    failed_recving=results.failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self._transfer_results()
        return results.sending or None, results.recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_stats(self) -> KvxferStats | None:
        return self._worker.take_stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvxferStats | None:
        return KvxferStats(data=dict(data)) if data is not None else KvxferStats()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
