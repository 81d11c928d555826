"""Peer lifecycle: which remote ranks this rank knows, at which boot epoch, with which NIXL agent
and which prepared descriptor lists.

A peer is keyed by (engine id, TP rank). Admitting a peer whose boot epoch changed drops the old
NIXL agent and every list prepared for it before loading the new one, so a restarted prefill is
never read through a stale agent. Prepared pairs are built lazily, once per (peer, head range).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from kvxfer.agents.messages import EngineInfo, MemoryKind
from kvxfer.agents.nixl_agent import DescList, NixlAgent
from kvxfer.errors import HandshakeError
from kvxfer.layouts import CacheRegion
from kvxfer.planning import Fallback, HeadRange, PairPlan, RequestIndexer, descriptor_table, pair

log = logging.getLogger(__name__)

# A prepared table bigger than this many rows is not worth NIXL's preparation: post spans instead.
MAX_TABLE_ROWS = 4_000_000


@dataclass(frozen=True)
class PreparedPair:
    """A pairing of the local cache with one peer's cache for one head range, ready to post."""

    plan: PairPlan
    local: DescList | None  # None: the table is too large, post explicit spans
    remote: DescList | None
    indexer: RequestIndexer | None  # rows of `local` and `remote` per request


@dataclass
class Peer:
    engine_id: str
    rank: int
    boot_epoch: int
    agent_name: str
    info: EngineInfo
    region: CacheRegion
    mem: MemoryKind
    pairs: dict[HeadRange, PreparedPair] = field(default_factory=dict)
    plans: dict[HeadRange, PairPlan] = field(default_factory=dict)  # staged: no lists needed

    @property
    def key(self) -> tuple[str, int]:
        return (self.engine_id, self.rank)


class PeerTable:
    """The peers of one rank's agent, and the lists prepared for them."""

    def __init__(self, agent: NixlAgent, local: CacheRegion, mem: MemoryKind, *,
                 fallback: Fallback = Fallback.NONE) -> None:
        self.agent = agent
        self.local = local
        self.mem = mem
        self.fallback = fallback
        self._peers: dict[tuple[str, int], Peer] = {}

    def get(self, engine_id: str, rank: int) -> Peer | None:
        return self._peers.get((engine_id, rank))

    def admit(self, info: EngineInfo) -> Peer:
        """Load (or reload, on a new boot epoch) a peer from its handshake info."""
        key = (info.engine_id, info.tp_rank)
        old = self._peers.get(key)
        if old is not None and old.boot_epoch == info.boot_epoch:
            return old
        if old is not None:
            log.info("peer %s rank %d restarted (epoch %d -> %d): dropping its old agent",
                     info.engine_id, info.tp_rank, old.boot_epoch, info.boot_epoch)
            self.forget(*key)
        if len(info.regions) != 1:
            raise HandshakeError(f"peer {info.engine_id} rank {info.tp_rank} offers "
                                 f"{len(info.regions)} cache regions; kvxfer pairs exactly one")
        region_info = info.regions[0]
        region = CacheRegion(region_info.desc, np.array(region_info.layer_addrs, dtype=np.uint64),
                             region_info.device_id)
        name = self.agent.add_peer(info.agent_metadata)
        if name != info.agent_name:
            self.agent.remove_peer(name)
            raise HandshakeError(f"peer {info.engine_id} rank {info.tp_rank}: agent metadata names "
                                 f"{name!r} but the handshake says {info.agent_name!r}")
        mem = region_info.memory
        peer = Peer(info.engine_id, info.tp_rank, info.boot_epoch, name, info, region, mem)
        self._peers[key] = peer
        return peer

    def forget(self, engine_id: str, rank: int) -> None:
        peer = self._peers.pop((engine_id, rank), None)
        if peer is not None:
            for prepared in peer.pairs.values():
                for dlist in (prepared.local, prepared.remote):
                    if dlist is not None:
                        self.agent.release_list(dlist)
            self.agent.remove_peer(peer.agent_name)

    def plan(self, peer: Peer, heads: HeadRange) -> PairPlan:
        """The pairing of our cache with `peer`'s for `heads` (what a staged transfer needs)."""
        found = peer.pairs.get(heads)
        if found is not None:
            return found.plan
        if heads not in peer.plans:
            peer.plans[heads] = pair(self.local, peer.region, heads, fallback=self.fallback)
        return peer.plans[heads]

    def prepared(self, peer: Peer, heads: HeadRange) -> PreparedPair:
        """The pairing of our cache with `peer`'s for `heads`, prepared on first use."""
        found = peer.pairs.get(heads)
        if found is not None:
            return found
        plan = pair(self.local, peer.region, heads, fallback=self.fallback)
        rows = plan.spans_per_chunk * (self.local.desc.num_blocks * self.local.desc.block_size
                                       // plan.chunk_tokens) * self.local.desc.num_layers
        if rows > MAX_TABLE_ROWS:
            prepared = PreparedPair(plan, None, None, None)
        else:
            local = self.agent.prepare(descriptor_table(plan, 0), mem=self.mem)
            remote = self.agent.prepare(descriptor_table(plan, 1), mem=peer.mem, peer=peer.agent_name)
            prepared = PreparedPair(plan, local, remote, RequestIndexer(plan))
        peer.pairs[heads] = prepared
        return prepared

    def close(self) -> None:
        for key in list(self._peers):
            self.forget(*key)
