"""One rank of a service: its engine shard and its transfer endpoint, and the commands rank 0
sends it. `PrefillRank` (prefill_rank.py) adds the producer role, `DecodeRank` (decode_rank.py)
the consumer role; `build_runtime` picks by the service's role.

Rank 0 and ranks 1..N-1 run the same classes; rank 0 calls `execute` directly, the others
through the command bus (`bus.py`, `worker.py`). Engine commands (prefill, decode) are
collective; transfers are per rank, each rank talking to its own peers.
"""

from __future__ import annotations

import logging
import os
import threading

from kvxfer.agents.endpoint import DeadlinePolicy, Endpoint, Identity
from kvxfer.agents.messages import Role
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.nixl_agent import AgentConfig, Threading
from kvxfer.agents.producer import Release
from kvxfer.daemons.commands import (
    Command,
    CountKernels,
    Decode,
    Describe,
    Described,
    Kernels,
    Prefill,
    Reply,
    Token,
)
from kvxfer.daemons.config import load_curve_keys
from kvxfer.daemons.rank_setup import (
    RankSetup,
    collective_backend,
    engine_config,
    model_fingerprint,
    staging_config,
)
from kvxfer.engine.engine import DecodeRequest, Engine
from kvxfer.engine.parallel import TPGroup
from kvxfer.engine.sampling import SamplingParams
from kvxfer.errors import ConfigError
from kvxfer.kernels import KERNELS
from kvxfer.planning import Fallback

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0


class RankRuntime:
    def __init__(self, setup: RankSetup, *, metrics: TransferMetrics | None = None) -> None:
        config = self.config = setup.config
        self.rank = setup.rank
        self.boot_epoch = setup.boot_epoch
        self.metrics = metrics or TransferMetrics()
        self.keys = load_curve_keys(config.curve) if config.curve is not None else None
        self.engine_config = engine_config(config)
        group = TPGroup.init(rank=setup.rank, size=config.tp, init_method=setup.dist_init,
                             backend=collective_backend(config)) if config.tp > 1 else TPGroup.single()
        self.engine = Engine(self.engine_config, group)
        identity = Identity(engine_id=config.engine_id, boot_epoch=setup.boot_epoch,
                            role=config.role, tp_size=config.tp, tp_rank=setup.rank,
                            model_fingerprint=model_fingerprint(self.engine_config))
        agent = AgentConfig(name=f"{config.engine_id}-{setup.boot_epoch}-r{setup.rank}",
                            threading=Threading.PROGRESS_THREAD if config.nixl_threads else Threading.APP_POLL)
        staging = staging_config(config, max_tokens=self.engine.model_config.max_position)
        self.endpoint = Endpoint(identity, self.engine.caches, self.engine.cache_desc, agent_config=agent,
                                 fallback=Fallback.FINE,
                                 deadline=DeadlinePolicy(config.transfer_deadline_s, config.expected_gbps),
                                 metrics=self.metrics, staging=staging)
        self.nixl_lock = threading.RLock()  # the NIXL agent: the command thread vs the role's threads
        self.info = self.endpoint.info()
        if config.warmup:
            self.engine.warmup()

    @property
    def advertised_side_channel(self) -> str:
        return f"tcp://{self.config.advertise_host}:{self.config.side_channel_port + self.rank}"

    def execute(self, command: Command) -> Reply:
        match command:
            case Decode():
                ids = self.engine.shape_block_ids(command.block_ids)
                out = self.engine.decode([DecodeRequest(token_id=command.token_id, block_ids=ids,
                                                        num_cached=command.num_cached,
                                                        sampling=sampling_of(command))])
                return Token(out.tokens[0])
            case Describe():
                return Described(self.info, self.advertised_side_channel, os.getpid())
            case CountKernels():
                if command.ready:
                    KERNELS.mark_ready()
                return Kernels(KERNELS.compiles(after_ready=False), KERNELS.compiles(after_ready=True))
        return self.execute_role(command)

    def execute_role(self, command: Command) -> Reply:
        raise ConfigError(f"a {self.config.role.value} rank does not take {type(command).__name__}")

    def idle(self) -> bool:
        """Between commands; True if it found work (the roles keep their own threads; nothing to
        drive here)."""
        return False

    def close(self) -> None:
        with self.nixl_lock:
            self.endpoint.close()
        self.engine.group.close()


def sampling_of(command: Prefill | Decode) -> SamplingParams:
    return SamplingParams(temperature=command.temperature, seed=command.seed)


def build_runtime(setup: RankSetup, *, metrics: TransferMetrics | None = None,
                  on_release: Release = lambda held, outcome: None) -> RankRuntime:
    """The rank of the service's role. `on_release`: what a prefill rank does when one of its
    leases ends (rank 0 frees the request's blocks; the other ranks hold none)."""
    if setup.config.role is Role.PREFILL:
        from kvxfer.daemons.prefill_rank import PrefillRank

        return PrefillRank(setup, metrics=metrics, on_release=on_release)
    from kvxfer.daemons.decode_rank import DecodeRank

    return DecodeRank(setup, metrics=metrics)
