"""A decode service's rank: its engine shard plus the consumer role (kvxfer.agents.consumer).
Each rank loads its own share of a request from its own producer ranks; rank 0's consumer also
serves the decode service's transfer choice (kvxfer.agents.transfer_choice)."""

from __future__ import annotations

from kvxfer.agents.capability import identity_of_peer
from kvxfer.agents.consumer import Consumer
from kvxfer.agents.consumer import Load as LoadJob
from kvxfer.agents.endpoint import shaped_ids
from kvxfer.agents.heartbeat import LeaseClient
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.prepare import prepare
from kvxfer.agents.sidechannel import ClientCache, ClientConfig
from kvxfer.daemons.commands import (
    AskLanding,
    Command,
    Load,
    Moved,
    Prepare,
    Prepared,
    Reply,
    StillLanding,
)
from kvxfer.daemons.rank_setup import RankSetup
from kvxfer.daemons.runtime import HANDSHAKE_TIMEOUT_S, RankRuntime

REQUEST_TIMEOUT_S = 5.0  # a renewal's round trip; a producer starts a push asked for within it


class DecodeRank(RankRuntime):
    def __init__(self, setup: RankSetup, *, metrics: TransferMetrics | None = None) -> None:
        super().__init__(setup, metrics=metrics)
        config = self.config
        clients = ClientCache(ClientConfig(keys=self.keys, insecure=config.insecure_plaintext))
        self.leases = LeaseClient(clients, timeout_s=REQUEST_TIMEOUT_S)
        public = self.keys.own.public.decode() if self.keys is not None else None
        self.consumer = Consumer(self.endpoint, clients=clients, leases=self.leases, nixl_lock=self.nixl_lock,
                                 identity=identity_of_peer(public, config.engine_id),
                                 handshake_timeout_s=HANDSHAKE_TIMEOUT_S, request_timeout_s=REQUEST_TIMEOUT_S,
                                 modes=config.mode.modes())

    def execute_role(self, command: Command) -> Reply:
        if isinstance(command, AskLanding):
            return StillLanding([t for t in command.transfer_ids if self.consumer.landing(t)])
        if isinstance(command, Prepare):
            times = prepare(self.consumer, command.params, nixl_lock=self.nixl_lock)
            return Prepared(times.handshake_s, times.connect_s, times.prepare_s, times.copiers_s)
        if not isinstance(command, Load):
            return super().execute_role(command)
        params = command.params
        local = shaped_ids(self.endpoint.region.desc, command.block_ids, params.num_tokens)
        loaded = self.consumer.load(LoadJob(params, local, params.num_tokens, mode=command.mode,
                                            staged=command.staged, valid_until_ms=command.valid_until_ms,
                                            not_after_unix=command.not_after_unix))
        s = loaded.summary
        return Moved(s.num_bytes, s.num_descriptors, s.seconds, loaded.staged)

    def idle(self) -> bool:
        return self.consumer.idle()

    def close(self) -> None:
        self.consumer.close()
        super().close()
