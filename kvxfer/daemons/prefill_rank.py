"""A prefill service's rank: its engine shard plus the producer role (kvxfer.agents.producer),
listening on its own side channel. Every rank holds its own lease of every request it prefilled;
consumer ranks confirm to each, and rank 0 frees the blocks when its lease ends."""

from __future__ import annotations

from kvxfer.agents.capability import Signer, master_secret
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.producer import Held, Producer, Release
from kvxfer.agents.sidechannel import ServerConfig
from kvxfer.daemons.commands import Command, Prefill, Reply, Token
from kvxfer.daemons.rank_setup import RankSetup
from kvxfer.daemons.runtime import RankRuntime, sampling_of


class PrefillRank(RankRuntime):
    def __init__(self, setup: RankSetup, *, metrics: TransferMetrics | None, on_release: Release) -> None:
        super().__init__(setup, metrics=metrics)
        config = self.config
        try:
            secret = self.keys.own.secret if self.keys is not None else None
            signer = Signer(master_secret(secret, engine_id=config.engine_id, boot_epoch=setup.boot_epoch))
            self.producer = Producer(self.endpoint, signer=signer, lease_s=config.lease_s, metrics=self.metrics,
                                     on_release=on_release, nixl_lock=self.nixl_lock)
            self.producer.start(ServerConfig(
                host=config.side_channel_host, port=config.side_channel_port + setup.rank, keys=self.keys,
                insecure=config.insecure_plaintext, engine_id=config.engine_id, boot_epoch=setup.boot_epoch))
        except BaseException:
            super().close()
            raise

    def execute_role(self, command: Command) -> Reply:
        if not isinstance(command, Prefill):
            return super().execute_role(command)
        ids = self.engine.shape_block_ids(command.block_ids)
        out = self.engine.prefill(command.token_ids, ids, sampling=sampling_of(command))
        expires = self.producer.hold(Held(command.transfer_id, tuple(command.block_ids), len(command.token_ids),
                                          command.binding))
        return Token(out.tokens[0], expires)

    def close(self) -> None:
        self.producer.stop()
        super().close()
