"""A decode service's rank: its engine shard plus the consumer role (kvxfer.agents.consumer).
Each rank loads its own share of a request from its own producer ranks; rank 0 also answers the
questions the decode service's transfer choice asks (descriptors, staging, calibration)."""

from __future__ import annotations

from kvxfer.agents.capability import identity_of_peer
from kvxfer.agents.consumer import Consumer
from kvxfer.agents.consumer import Load as LoadJob
from kvxfer.agents.endpoint import shaped_ids
from kvxfer.agents.heartbeat import LeaseClient
from kvxfer.agents.messages import TransferParams
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.prepare import prepare
from kvxfer.agents.sidechannel import ClientCache, ClientConfig
from kvxfer.daemons.commands import Command, Load, Moved, Prepare, Prepared, Reply
from kvxfer.daemons.rank_setup import RankSetup
from kvxfer.daemons.runtime import HANDSHAKE_TIMEOUT_S, RankRuntime

REQUEST_TIMEOUT_S = 5.0  # one side-channel call on a request's path (a push asked for, a renewal)


class DecodeRank(RankRuntime):
    def __init__(self, setup: RankSetup, *, metrics: TransferMetrics | None = None) -> None:
        super().__init__(setup, metrics=metrics)
        config = self.config
        clients = ClientCache(ClientConfig(keys=self.keys, insecure=config.insecure_plaintext))
        self.leases = LeaseClient(clients, timeout_s=REQUEST_TIMEOUT_S)
        public = self.keys.own.public.decode() if self.keys is not None else None
        self.consumer = Consumer(self.endpoint, clients=clients, leases=self.leases, nixl_lock=self.nixl_lock,
                                 identity=identity_of_peer(public, config.engine_id),
                                 handshake_timeout_s=HANDSHAKE_TIMEOUT_S, request_timeout_s=REQUEST_TIMEOUT_S)

    def execute_role(self, command: Command) -> Reply:
        if isinstance(command, Prepare):
            times = prepare(self.consumer, command.params, nixl_lock=self.nixl_lock)
            return Prepared(times.handshake_s, times.connect_s, times.prepare_s)
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

    # ---- rank 0: what the transfer choice needs ----------------------------------------------

    def direct_descriptors(self, params: TransferParams) -> int:
        """Descriptors a direct transfer of the request posts, all decode ranks (they are alike)."""
        with self.nixl_lock:
            per_layer = sum(self.endpoint.peers.plan(self.consumer.link(params, s.prefill_rank).peer, s.heads)
                            .units_per_layer(params.num_tokens) for s in self.consumer.sources(params))
        return per_layer * self.endpoint.region.desc.num_layers * self.config.tp

    def can_stage(self, params: TransferParams) -> bool:
        """Both sides have staging slots and this rank's share fits one."""
        area = self.endpoint.staging
        if area is None or area.pool is None:
            return False
        peers = [self.consumer.link(params, s.prefill_rank).peer for s in self.consumer.sources(params)]
        return (all(p.info.staging is not None and p.info.staging.slots_bytes for p in peers)
                and self.consumer.expected_bytes(params, params.num_tokens) <= area.pool.slot_bytes)

    def close(self) -> None:
        self.consumer.close()
        super().close()
