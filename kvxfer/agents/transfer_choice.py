"""How a consumer rank's requests move: READ or WRITE, direct or staged.

One chooser per consumer, driven by the daemons' decode service (rank 0 decides for every decode
rank: they are alike) and by each vLLM consumer worker (each decides for itself). Per producer
(engine, boot epoch) it calibrates the cost model once (kvxfer.planning.cost, probes through the
staging areas, kvxfer.agents.calibrate); per request it picks the cheapest of what the settings
allow, each estimate corrected by what that path's recent requests took (`observe`: the host
work per request no probe measures). Without calibration (staging off on a side, or the probes
failed) a rule decides: push into GPU memory (a pull over CUDA IPC falls back to a slow path),
pull from host memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from kvxfer.agents.messages import MemoryKind, Mode, TransferParams
from kvxfer.errors import KvxferError
from kvxfer.planning.cost import Choice, Excess, FabricCosts, Path, choose

if TYPE_CHECKING:  # the settings import the choices without NIXL
    from kvxfer.agents.consumer import Consumer

log = logging.getLogger(__name__)


class ModeChoice(str, Enum):
    """A transfer `Mode`, or AUTO (`--mode`; the vLLM connector's `mode`)."""

    READ = "read"  # decode pulls from prefill's cache
    WRITE = "write"  # prefill pushes into blocks decode allocated first
    AUTO = "auto"  # the faster of the two, measured at handshake

    def fixed(self) -> Mode | None:
        """The mode this choice fixes; None for AUTO (the per-request pick)."""
        return {ModeChoice.READ: Mode.READ, ModeChoice.WRITE: Mode.WRITE}.get(self)

    def modes(self) -> tuple[Mode, ...]:
        """The modes a consumer with this setting may use: what its handshake advertises (a
        producer prepares pushes only for consumers that may ask for them)."""
        fixed = self.fixed()
        return (fixed,) if fixed else (Mode.READ, Mode.WRITE)


class TransferPathChoice(str, Enum):
    """A transfer `Path`, or AUTO (`--transfer-path`; the vLLM connector's `transfer_path`)."""

    AUTO = "auto"  # the cost model's pick (calibrated against each producer at handshake)
    DIRECT = "direct"  # one NIXL descriptor per span, zero-copy
    STAGED = "staged"  # gather, one descriptor, scatter (a WRITE; needs staging slots on both sides)


SHAPES_MAX = 4096  # request lengths remembered per producer (then forgotten all at once)


@dataclass(frozen=True)
class _Shape:
    """What the choice needs of a request, fixed by its producer's pairing and its length:
    worked out once per length, not on every request's path."""

    num_bytes: int  # every rank of this choice receives
    descriptors: int  # a direct transfer posts, every rank
    fits_slot: bool  # staging is on at both sides and each rank's share fits a slot


@dataclass
class _Producer:
    """What the chooser knows of one producer at one boot epoch (dropped when it restarts)."""

    costs: FabricCosts | None  # its calibration; None: it failed, the rule decides
    excess: Excess = field(default_factory=Excess)  # what its requests took beyond the model
    shapes: dict[int, _Shape] = field(default_factory=dict)  # by request length
    announced: tuple[Mode, Path] | None = None  # the choice the log last named


@dataclass(frozen=True)
class TransferPlan:
    mode: Mode
    path: Path  # direct (one descriptor per span) or staged (gather, one descriptor, scatter)
    why: str  # for the log: the cost model's candidates, the rule, or the setting
    choice: Choice | None = None  # the cost model's estimates, when it decided

    @property
    def staged(self) -> bool:
        return self.path is Path.STAGED


class TransferChooser:
    def __init__(self, consumer: Consumer, *, mode: ModeChoice, path: TransferPathChoice, ranks: int = 1) -> None:
        self.consumer = consumer
        self.mode = mode
        self.path = path
        self.ranks = ranks  # consumer ranks this choice is made for (alike: bytes and descriptors scale)
        self._producers: dict[tuple[str, int], _Producer] = {}  # by (engine, boot epoch)

    def plan(self, params: TransferParams) -> TransferPlan:
        """How this request's KV moves: the cheapest of what `mode` and `path` allow."""
        if self.mode is ModeChoice.READ:
            return TransferPlan(Mode.READ, Path.DIRECT, "mode read")
        producer = self._producer(params)
        costs, shape = producer.costs, self._shape(producer, params)
        stage = self.path is not TransferPathChoice.DIRECT and shape.fits_slot
        if self.path is TransferPathChoice.STAGED:
            return self._announce(producer, params, TransferPlan(Mode.WRITE, Path.STAGED if stage else Path.DIRECT,
                                                       "transfer path staged" + ("" if stage else " (does not fit "
                                                                                 "a slot: direct)")))
        if costs is None:
            vram = self.consumer.endpoint.mem is MemoryKind.VRAM
            mode = Mode.WRITE if self.mode is ModeChoice.WRITE or vram else Mode.READ
            path = Path.STAGED if mode is Mode.WRITE and stage and vram else Path.DIRECT
            return self._announce(producer, params, TransferPlan(mode, path, "rule (no calibration)"))
        allowed = [(Path.DIRECT, True)] + ([(Path.STAGED, True)] if stage else [])
        if self.mode is ModeChoice.AUTO:
            allowed.append((Path.DIRECT, False))
        if len(allowed) == 1:  # nothing to compare: no estimate on the request's path
            why = "transfer path direct" if self.path is TransferPathChoice.DIRECT else "it fits no staging slot"
            return self._announce(producer, params, TransferPlan(
                Mode.WRITE, Path.DIRECT, f"the only transfer the settings allow (mode write, {why})"))
        choice = choose(costs, num_bytes=shape.num_bytes, descriptors=shape.descriptors, allowed=tuple(allowed),
                        excess=producer.excess)
        best = choice.best
        return self._announce(producer, params, TransferPlan(Mode.WRITE if best.write else Mode.READ, best.path,
                                                   f"cost model: {choice.describe()}", choice))

    def costs(self, params: TransferParams) -> FabricCosts | None:
        """Handshake with the producer and calibrate against it, once per boot epoch."""
        return self._producer(params).costs

    def _producer(self, params: TransferParams) -> _Producer:
        key = (params.engine_id, params.boot_epoch)
        known = self._producers.get(key)
        if known is None:
            self.consumer.links(params)
            try:
                costs = self.consumer.calibrate(params)
            except KvxferError as err:  # the rule still works; say why it is used
                log.warning("calibration against %s failed, choosing transfers by rule: %s", params.engine_id, err)
                costs = None
            for old in [k for k in self._producers if k[0] == params.engine_id]:  # its earlier epochs
                del self._producers[old]
            known = self._producers[key] = _Producer(costs)
        return known

    def observe(self, params: TransferParams, plan: TransferPlan, seconds: float) -> None:
        """A request moved by `plan` took `seconds`: what later choices add to its path's
        estimate. A staged request that found no slot free and moved directly counts for the
        staged path: its wait for a slot is what choosing staging cost."""
        producer = self._producers.get((params.engine_id, params.boot_epoch))
        if plan.choice is None or producer is None:
            return  # not the cost model's choice: a setting or the rule decided, nothing to correct
        best = plan.choice.best
        producer.excess.observe(best.path, best.write, modeled_s=best.modeled_s, seconds=seconds)

    def _shape(self, producer: _Producer, params: TransferParams) -> _Shape:
        shape = producer.shapes.get(params.num_tokens)
        if shape is None:
            if len(producer.shapes) >= SHAPES_MAX:
                producer.shapes.clear()
            shape = producer.shapes[params.num_tokens] = _Shape(
                self.consumer.expected_bytes(params, params.num_tokens) * self.ranks,
                self.direct_descriptors(params), self.can_stage(params))
        return shape

    def direct_descriptors(self, params: TransferParams) -> int:
        """Descriptors a direct transfer of the request posts, all `ranks` consumer ranks."""
        consumer = self.consumer
        endpoint = consumer.endpoint
        with consumer.nixl_lock:
            per_layer = sum(endpoint.peers.plan(consumer.link(params, s.prefill_rank).peer, s.heads)
                            .units_per_layer(params.num_tokens) for s in consumer.sources(params))
        return per_layer * endpoint.region.desc.num_layers * self.ranks

    def can_stage(self, params: TransferParams) -> bool:
        """Both sides have staging slots and this rank's share fits one."""
        consumer = self.consumer
        area = consumer.endpoint.staging
        if area is None or area.pool is None:
            return False
        peers = [consumer.link(params, s.prefill_rank).peer for s in consumer.sources(params)]
        return (all(p.info.staging is not None and p.info.staging.slots_bytes for p in peers)
                and consumer.expected_bytes(params, params.num_tokens) <= area.pool.slot_bytes)

    def _announce(self, producer: _Producer, params: TransferParams, plan: TransferPlan) -> TransferPlan:
        """Log the first choice for each producer epoch and each change of choice (INFO), every
        request's at DEBUG: a reader of the log sees why transfers take the path they take."""
        if producer.announced != (plan.mode, plan.path):
            producer.announced = (plan.mode, plan.path)
            log.info("transfers from %s (epoch %d): %s %s, by %s", params.engine_id, params.boot_epoch,
                     plan.path.value, plan.mode.value, plan.why)
        else:
            log.debug("request %s: %s %s, by %s", params.request_id[:8], plan.path.value, plan.mode.value, plan.why)
        return plan
