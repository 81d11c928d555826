"""Consumer (decode) rank: load a producer's KV into the blocks vLLM allocated.

Per request: ask the TP mapping which producer ranks and heads this rank needs, handshake with
each (cached per producer rank, redone when its boot epoch changes), then READ (one transfer per
producer rank; NIXL notifies each producer when its part is done) or, in WRITE mode, ask each
producer rank to push and wait for its notifications. Producer ranks that no consumer rank reads
(their heads are read from a replica) are released by consumer rank 0. Every failure is a
KvxferError; the caller reports the request as failed and vLLM applies `kv_load_failure_policy`.
All of it runs on the worker's service thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from kvxfer.agents import messages as m
from kvxfer.agents.compat import check_compatible
from kvxfer.agents.endpoint import Endpoint, Leg, TransferSummary
from kvxfer.agents.nixl_agent import Backoff, PollPolicy
from kvxfer.agents.peers import Peer
from kvxfer.agents.sidechannel import ClientConfig, SideChannelClient
from kvxfer.errors import (
    ConfigError,
    IncompatiblePeerError,
    KvxferError,
    PlanError,
    TransferTimeout,
)
from kvxfer.integrations.vllm.params import LoadJob
from kvxfer.layouts import num_blocks_for
from kvxfer.planning import TPMapping, map_tp

log = logging.getLogger(__name__)

NOTIFY_TIMEOUT_S = 1.0  # best-effort messages (abort, failure) to a producer that may be dead


@dataclass(frozen=True)
class ConsumerSettings:
    client: ClientConfig
    handshake_timeout_s: float
    write: bool  # WRITE mode: producers push


class Consumer:
    def __init__(self, endpoint: Endpoint, settings: ConsumerSettings) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.rank = endpoint.identity.tp_rank
        self.tp_size = endpoint.identity.tp_size
        self._clients: dict[str, SideChannelClient] = {}  # address -> client
        modes = (m.Mode.WRITE,) if settings.write else (m.Mode.READ,)
        self._hello = m.HandshakeRequest(engine=endpoint.info(modes))

    def load(self, job: LoadJob) -> TransferSummary:
        """Move the job's tokens into its local blocks, or raise KvxferError."""
        params = job.params
        mapping = self._mapping(params)
        sources = mapping.sources_of(self.rank)
        peers = {a.prefill_rank: self._peer(params, a.prefill_rank) for a in sources}
        remote_ids = self._remote_ids(job, next(iter(peers.values())))
        local_ids = np.asarray(job.local_ids, dtype=np.int64)
        legs = [Leg(peers[a.prefill_rank], a.heads, remote_ids) for a in sources]
        if self.settings.write and job.skip_tokens == 0:
            summary = self._pushed(job, legs, local_ids)
        else:
            summary = self.endpoint.read(params.request_id, legs, local_ids, job.num_tokens)
        self._release_unread(params, mapping)
        return summary

    def release(self, params: m.TransferParams, reason: str) -> None:
        """Give every producer rank's blocks back without reading (best effort)."""
        if self.rank != 0:
            return
        for rank in range(params.tp_size):
            self._tell(params, rank, m.Abort(request_id=params.request_id, reason=reason))

    def fail(self, params: m.TransferParams, err: KvxferError) -> None:
        """After a failed load: tell the producer ranks we read from to free the blocks now."""
        for rank in {a.prefill_rank for a in self._mapping(params).sources_of(self.rank)}:
            self._tell(params, rank, m.TransferDone(
                request_id=params.request_id, consumer_rank=self.rank, status=m.Status.ERROR,
                error_kind=err.kind, error_message=str(err)[:1000]))

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    # -- planning the request's legs -------------------------------------------------------------

    def _mapping(self, params: m.TransferParams) -> TPMapping:
        return map_tp(self.endpoint.region.desc.total_heads, params.tp_size, self.tp_size)

    def _remote_ids(self, job: LoadJob, peer: Peer) -> np.ndarray:
        """The producer's blocks holding tokens [skip, skip + num_tokens)."""
        block_size = peer.region.desc.block_size
        if job.skip_tokens % block_size:
            raise PlanError(f"{job.skip_tokens} prompt tokens were cached locally, not a multiple of "
                            f"the producer's block_size={block_size}")
        first = job.skip_tokens // block_size
        ids = job.params.block_ids[first:first + num_blocks_for(job.num_tokens, block_size)]
        return np.asarray(ids, dtype=np.int64)

    def _release_unread(self, params: m.TransferParams, mapping: TPMapping) -> None:
        """Producer ranks nobody reads wait for no notification: rank 0 releases them."""
        if self.rank != 0:
            return
        read = {a.prefill_rank for a in mapping.assignments}
        for rank in sorted(set(range(params.tp_size)) - read):
            self._tell(params, rank, m.TransferDone(request_id=params.request_id, consumer_rank=0))

    # -- side channel ----------------------------------------------------------------------------

    def _address(self, params: m.TransferParams, rank: int) -> str:
        parts = urlsplit(params.side_channel)
        if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
            raise ConfigError(f"kv_transfer_params.side_channel={params.side_channel!r}: expected tcp://HOST:PORT")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"tcp://{host}:{parts.port + rank}"

    def _client(self, address: str) -> SideChannelClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = SideChannelClient(address, self.settings.client)
        return client

    def _call(self, params: m.TransferParams, rank: int, msg: m.Message, *,
              timeout_s: float | None = None) -> m.Message:
        address = self._address(params, rank)
        return self._client(address).request(msg, timeout_s=timeout_s or self.settings.handshake_timeout_s)

    def _tell(self, params: m.TransferParams, rank: int, msg: m.Message) -> None:
        try:
            self._call(params, rank, msg, timeout_s=min(NOTIFY_TIMEOUT_S, self.settings.handshake_timeout_s))
        except KvxferError as err:
            log.warning("could not tell producer %s rank %d (%s): %s", params.engine_id, rank,
                        type(msg).__name__, err)

    def _peer(self, params: m.TransferParams, rank: int) -> Peer:
        """The producer rank as a NIXL peer, handshaking when unknown or restarted."""
        peer = self.endpoint.peers.get(params.engine_id, rank)
        if peer is not None and peer.boot_epoch == params.boot_epoch:
            return peer
        ours = self._hello
        started = time.perf_counter()
        reply = self._call(params, rank, ours)
        if not isinstance(reply, m.HandshakeReply):
            raise ConfigError(f"producer {params.engine_id} rank {rank} answered the handshake with "
                              f"{type(reply).__name__}")
        check_compatible(ours, reply, peer=f"{params.engine_id}/{rank}")
        self._check_whole_blocks(reply.engine, f"{params.engine_id}/{rank}")
        if reply.engine.boot_epoch != params.boot_epoch:
            raise KvxferError(f"producer {params.engine_id} rank {rank} restarted (boot epoch "
                              f"{reply.engine.boot_epoch}, request made at {params.boot_epoch}); "
                              f"its KV for request {params.request_id} is gone")
        peer = self.endpoint.peers.admit(reply.engine)
        log.info("kvxfer handshake with producer %s rank %d (epoch %x): %.1f ms", params.engine_id, rank,
                 params.boot_epoch, (time.perf_counter() - started) * 1e3)
        return peer

    def _check_whole_blocks(self, producer: m.EngineInfo, name: str) -> None:
        """vLLM's CPU attention kernel orders tokens inside a K or V half of a block its own way:
        whole (block, head) regions move correctly, parts of blocks do not. Measured through the
        `packed` strides: producer block_size 64 -> consumer 128 gave wrong tokens; 64 -> 64 and
        128 -> 128 gave exact ones. So vLLM CPU caches pair only at equal block sizes."""
        ours, theirs = self.endpoint.region.desc, producer.regions[0].desc
        if ours.layout == theirs.layout == "packed" and ours.block_size != theirs.block_size:
            raise IncompatiblePeerError(name, [("caches[0].block_size", ours.block_size, theirs.block_size)])

    # -- WRITE mode --------------------------------------------------------------------------------

    def _pushed(self, job: LoadJob, legs: list[Leg], local_ids: np.ndarray) -> TransferSummary:
        """Ask each producer rank to push into our blocks; wait for each one's notification."""
        params = job.params
        producer_ranks = sorted({leg.peer.rank for leg in legs})
        ask = m.WriteRequest(request_id=params.request_id, decode_rank=self.rank,
                             block_ids=[int(b) for b in local_ids],
                             decode_engine_id=self.endpoint.identity.engine_id)
        started = time.perf_counter()
        for rank in producer_ranks:
            self._call(params, rank, ask)
        desc = self.endpoint.region.desc
        num_bytes = desc.block_bytes * local_ids.size * desc.num_layers
        self._wait_notifs(params.request_id, set(producer_ranks), self.endpoint.deadline.seconds(num_bytes))
        return TransferSummary(m.Mode.WRITE, num_bytes=num_bytes, seconds=time.perf_counter() - started,
                               peers=[f"{params.engine_id}/{r}" for r in producer_ranks])

    def _wait_notifs(self, transfer_id: str, ranks: set[int], timeout_s: float) -> None:
        deadline, backoff = time.monotonic() + timeout_s, Backoff(PollPolicy())
        while ranks:
            for notif in self.endpoint.collect_notifs():
                if notif.request_id == transfer_id:
                    ranks.discard(notif.rank)
            if not ranks:
                return
            if time.monotonic() > deadline:
                raise TransferTimeout(f"request {transfer_id}: producer rank(s) {sorted(ranks)} did not "
                                      f"write within {timeout_s:.1f} s")
            backoff.pause()
