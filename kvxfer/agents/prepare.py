"""Meeting a producer before its first request: what a consumer rank's first load from it would
otherwise build inside that request, built ahead.

A consumer told a producer's side channel up front learns who serves there (`discover`: a Ping
to rank 0 gives its engine id and boot epoch), then each consumer rank `prepare`s: a handshake
with every producer rank (all of them get our DONE), a NIXL connection to each rank it reads
from, wired by one probe READ (kvxfer.agents.wiring), and the descriptor lists of its share
(`endpoint.peers.prepared`). The producer prepares its pushes to us, and wires its own
connection, on its own thread once we handshook (kvxfer.agents.producer).

Built on the consumer's public API (`link`, `sources`, `endpoint.peers`): the same handshakes and
prepared pairs a request makes, made earlier, so a request finds them cached per (producer rank,
boot epoch) and a restarted producer is met again by whichever comes first.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from kvxfer.agents import messages as m
from kvxfer.agents.consumer import Consumer
from kvxfer.agents.endpoint import Leg
from kvxfer.agents.sidechannel import ClientCache, Target, producer_target, rank_address
from kvxfer.agents.wiring import wire_connection
from kvxfer.errors import HandshakeError, KvxferError

# The request id of parameters that name a producer but no request: never sent, never signed.
NO_REQUEST = "0" * 32


@dataclass(frozen=True)
class ProducerRef:
    """One producer at one boot epoch, as a consumer reaches it."""

    side_channel: str  # rank 0's address, tcp://HOST:PORT (rank r listens on PORT + r)
    engine_id: str
    boot_epoch: int
    tp_size: int = 0  # 0: not known until rank 0's handshake (`with_tp_size`)

    @property
    def key(self) -> tuple[str, int]:
        return (self.engine_id, self.boot_epoch)

    def params(self) -> m.TransferParams:
        """Parameters naming this producer and no request: all `Consumer.link` and `sources`
        read of a request's parameters (engine, epoch, address, TP size)."""
        return m.TransferParams(engine_id=self.engine_id, boot_epoch=self.boot_epoch, request_id=NO_REQUEST,
                                block_ids=[], side_channel=self.side_channel, tp_size=max(self.tp_size, 1))


@dataclass(frozen=True)
class PrepareTimes:
    """What one consumer rank's preparation for one producer took, by step (seconds)."""

    handshake_s: float = 0.0
    connect_s: float = 0.0
    prepare_s: float = 0.0
    copiers_s: float = 0.0


def discover(clients: ClientCache, side_channels: list[str], *, timeout_s: float) -> list[ProducerRef | KvxferError]:
    """Who serves at each side channel (well-formed: `rank_address` accepts it) now: a Ping to
    each rank 0, all at once. Each answer, or the error asking ended with (not up yet, refused)."""
    calls = [(Target(rank_address(address, 0)), m.Ping()) for address in side_channels]
    replies = clients.request_all(calls, timeout_s=timeout_s)
    return [_ref_of(address, reply) for address, reply in zip(side_channels, replies, strict=True)]


def _ref_of(address: str, reply: m.Message | KvxferError) -> ProducerRef | KvxferError:
    if isinstance(reply, m.Pong) and reply.engine_id:
        return ProducerRef(address, reply.engine_id, reply.boot_epoch)
    if isinstance(reply, KvxferError):
        return reply
    return HandshakeError(f"{address} answered {type(reply).__name__} to a ping, not a producer's pong")


def with_tp_size(consumer: Consumer, ref: ProducerRef) -> ProducerRef:
    """`ref` with the producer's TP size, from a handshake with its rank 0 (kept: a request's
    first step is that same handshake)."""
    info = consumer.link(ref.params(), 0).peer.info
    return ProducerRef(ref.side_channel, ref.engine_id, ref.boot_epoch, info.tp_size)


def prepare(consumer: Consumer, params: m.TransferParams, *, nixl_lock: threading.RLock) -> PrepareTimes:
    """Everything this consumer rank's first load from `params`'s producer would build: a link
    with every producer rank, a NIXL connection to each it reads from, the prepared descriptor
    lists of its share, and on a GPU the copier that scatters a staged push of it (compiled or
    loaded, its graph captured). Raises the KvxferError of the step that failed."""
    started = time.perf_counter()
    links = consumer.links(params)
    sources = consumer.sources(params)
    # Every side-channel client the request path may use (renewals, a long push wait's pings), made now.
    consumer.clients.request_all([(producer_target(params, r), m.Ping()) for r in range(params.tp_size)],
                                 timeout_s=consumer.request_timeout_s)
    linked = time.perf_counter()
    with nixl_lock:
        for rank in sorted({s.prefill_rank for s in sources}):
            wire_connection(consumer.endpoint, links[rank].peer, timeout_s=consumer.request_timeout_s)
    connected = time.perf_counter()
    with nixl_lock:
        for s in sources:
            consumer.endpoint.peers.prepared(links[s.prefill_rank].peer, s.heads)
    prepared = time.perf_counter()
    legs = [Leg(links[s.prefill_rank].peer, s.heads, np.empty(0, dtype=np.int64)) for s in sources]
    with nixl_lock:
        copiers_s = consumer.endpoint.warm_staging(legs, to_slot=False)
    return PrepareTimes(linked - started, connected - linked, prepared - connected, copiers_s)
