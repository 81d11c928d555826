"""The bench coordinator: spawns one process per rank and talks to them over the daemons'
command bus (`kvxfer.daemons.bus.Bus`), relays their handshakes, drives runs and collects
figures. `BenchSession` is a context manager so tests can run several ops on one set of
processes; `run_bench` is what `kvxfer bench` calls."""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import numpy as np
import torch

from kvxfer.agents.messages import Role
from kvxfer.bench import initiator, staged
from kvxfer.bench import rank as rank_mod
from kvxfer.bench.cache import host_buffer
from kvxfer.bench.config import (
    BenchConfig,
    BenchResult,
    OpFigures,
    PlanKind,
    Strategy,
    StrategyChoice,
)
from kvxfer.bench.messages import (
    ENCODER,
    FROM_RANK,
    Calibrate,
    Calibrated,
    Dump,
    Hello,
    Latency,
    Peers,
    PingPong,
    Reserve,
    Reserved,
    Run,
    RunReport,
    Scramble,
    Verified,
    Verify,
)
from kvxfer.daemons.bus import Bus
from kvxfer.errors import KvxferError, TransferError
from kvxfer.layouts import CacheRegion
from kvxfer.planning import Fallback, map_tp, pair, request_indices
from kvxfer.planning.cost import FabricCosts, Path, choose

log = logging.getLogger(__name__)
NUM_PINGS = 200
AUTO_ITERS = 2  # timed runs per strategy when --mode auto chooses (the median decides)
STARTUP_S = 300.0  # spawning, allocating and filling caches


@dataclass(frozen=True)
class RunFigures:
    transfer_ms: float
    num_bytes: int
    num_descriptors: int
    nixl_descriptors: int
    num_transfers: int
    plan_us: float
    post_us: float
    phases_ms: dict[str, float] = field(default_factory=dict)  # staged: ms from start


class BenchSession:
    """Prefill and decode rank processes with registered caches and exchanged handshakes."""

    def __init__(self, cfg: BenchConfig) -> None:
        cfg.check()
        self.cfg = cfg
        self.bus = Bus(ENCODER, FROM_RANK)
        self.hellos: list[Hello] = []

    def __enter__(self) -> BenchSession:
        blob = msgspec.msgpack.encode(self.cfg)
        roles = [(Role.PREFILL, r) for r in range(self.cfg.prefill_tp)]
        roles += [(Role.DECODE, r) for r in range(self.cfg.decode_tp)]
        try:
            self.bus.spawn(rank_mod.main, lambda i: (blob, *roles[i]), range(len(roles)),
                           label=lambda i: f"bench rank {roles[i][0].value}{roles[i][1]}")
            self.hellos = [_expect(r, Hello) for r in self.bus.gather(STARTUP_S)]
            self._all(Peers(hellos=self.hellos), STARTUP_S)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.bus.close(timeout_s=10.0)

    def run(self, strategy: Strategy, kind: PlanKind | None = None, *, scramble: bool = False,
            snapshot: bool = False) -> RunFigures:
        """One request moved from every prefill rank to every decode rank."""
        kind = kind or self.cfg.plan
        if scramble or snapshot:
            self.scramble(snapshot=snapshot)
        timeout = self.cfg.deadline_slack_s + 600.0
        reserve_s, offsets = 0.0, {}
        if kind is PlanKind.STAGED:
            reserved = [_expect(r, Reserved) for r in self._all(Reserve(), timeout)]
            reserve_s = max(r.seconds for r in reserved)
            offsets = {rank: r.offsets for rank, r in enumerate(reserved[self.cfg.prefill_tp:])}
        replies = self._all(Run(strategy=strategy, plan=kind, staging_offsets=offsets), timeout)
        return _figures([_expect(r, RunReport) for r in replies], reserve_s)

    def ping_pong(self, count: int) -> list[float]:
        """Round-trip times (us) of NIXL notifications between decode0 and prefill0."""
        replies = self._all(PingPong(count=count), STARTUP_S)
        return next(r.rtt_us for r in replies if isinstance(r, Latency))

    def scramble(self, *, snapshot: bool = False) -> None:
        """Overwrite every decode cache (and snapshot every cache for `dump` when asked)."""
        self._all(Scramble(snapshot=snapshot), STARTUP_S)

    def verify(self) -> tuple[bool, str]:
        replies = [_expect(r, Verified) for r in self._all(Verify(), STARTUP_S)]
        bad = [r.detail for r in replies if not r.ok]
        return not bad, "; ".join(bad)

    def calibrate(self) -> FabricCosts:
        reply = next(r for r in self._all(Calibrate(), STARTUP_S) if isinstance(r, Calibrated))
        return FabricCosts(**msgspec.structs.asdict(reply))

    def dump(self, directory: str) -> None:
        self._all(Dump(directory=directory), STARTUP_S)

    def _all(self, msg: msgspec.Struct, timeout_s: float) -> list[Any]:
        """Send to every rank, then collect every reply (ranks work in parallel); a rank that
        failed, died or missed `timeout_s` raises (the bus's errors)."""
        self.bus.send_all(msg)
        return self.bus.gather(timeout_s)


def _figures(reports: list[RunReport], reserve_s: float) -> RunFigures:
    """One run's figures over every rank: from the first rank's start to the last end (the
    monotonic clock is shared by the processes); staged runs add the reservation before it."""
    active = [r for r in reports if r.num_transfers]
    reserve_ns = int(reserve_s * 1e9)
    start_ns = min(r.start_ns for r in active)
    end_ns = max([r.end_ns for r in active] + [r.receive_end_ns for r in reports])
    phases: dict[str, int] = {}
    for r in reports:  # the slowest rank's time for each step
        for name, t in r.phases_ns.items():
            phases[name] = max(phases.get(name, 0), t)
    phases_ms = {k: (phases[k] - start_ns + reserve_ns) / 1e6 for k in staged.PHASES if k in phases}
    if reserve_ns:
        phases_ms = {"reserved": reserve_s * 1e3, **phases_ms}
    return RunFigures(
        transfer_ms=(end_ns - start_ns + reserve_ns) / 1e6,
        num_bytes=sum(r.num_bytes for r in active),
        num_descriptors=sum(r.num_descriptors for r in active),
        nixl_descriptors=sum(r.nixl_descriptors for r in active),
        num_transfers=sum(r.num_transfers for r in active),
        plan_us=max([r.plan_us for r in active] + [reserve_s * 1e6]),  # staged: the receivers build parts
        post_us=max(r.post_us for r in active),
        phases_ms=phases_ms)


def _expect(reply: object, cls: type) -> Any:
    if not isinstance(reply, cls):
        raise KvxferError(f"bench: expected {cls.__name__}, got {type(reply).__name__}")
    return reply


class CopyBaseline:
    """The copy a transfer is compared with: `num_bytes` between two buffers allocated like the
    caches (one host thread on CPU, device to device on CUDA), measured right after each timed
    transfer so both see the same machine load."""

    def __init__(self, num_bytes: int, *, device: str, huge_pages: bool) -> None:
        self.num_bytes = num_bytes
        self.device = device
        if device == "cuda":
            self._src = torch.ones(num_bytes, dtype=torch.uint8, device="cuda")
            self._dst = torch.zeros_like(self._src)
        else:
            self._src = host_buffer(num_bytes, huge_pages=huge_pages)
            self._dst = host_buffer(num_bytes, huge_pages=huge_pages)
            self._src.fill_(1)
        self.measure()  # touch the destination

    def measure(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            self._dst.copy_(self._src)
            torch.cuda.synchronize()
        else:
            t0 = time.perf_counter()
            np.copyto(self._dst.numpy(), self._src.numpy())  # one thread, as the figure says
        return self.num_bytes / (time.perf_counter() - t0) / 1e9


def measure(session: BenchSession, strategy: Strategy, iters: int, *, verify_last: bool = False,
            snapshot: bool = False, baseline: bool = False,
            kind: PlanKind | None = None) -> tuple[OpFigures, RunFigures]:
    """One warm-up run, then `iters` timed runs (each followed by the copy baseline when asked);
    the last one on a scrambled decode cache when it is to be verified."""
    warm = session.run(strategy, kind)
    copy = CopyBaseline(warm.num_bytes, device=session.cfg.device,
                        huge_pages=session.cfg.huge_pages) if baseline else None
    runs, copies = [], []
    for i in range(iters):
        last = i == iters - 1
        runs.append(session.run(strategy, kind, scramble=verify_last and last, snapshot=snapshot and last))
        copies.append(copy.measure() if copy else 0.0)
    times = [r.transfer_ms for r in runs]
    gbps = [r.num_bytes / (t / 1e3) / 1e9 for r, t in zip(runs, times, strict=True)]
    ratios = [g / c if c else 0.0 for g, c in zip(gbps, copies, strict=True)]
    figures = OpFigures(transfer_ms=statistics.median(times), gbps=statistics.median(gbps),
                        transfer_ms_all=times, memcpy_gbps=statistics.median(copies),
                        ratio=statistics.median(ratios), ratio_all=ratios,
                        phases_ms={k: statistics.median(r.phases_ms[k] for r in runs)
                                   for k in runs[-1].phases_ms if all(k in r.phases_ms for r in runs)})
    return figures, runs[-1]


def choose_plan(session: BenchSession, cfg: BenchConfig) -> tuple[PlanKind, Strategy, dict]:
    """--plan auto: calibrate on this fabric, estimate direct (prepped) and staged, pick."""
    costs = session.calibrate()
    mapping = map_tp(cfg.kv_heads, cfg.prefill_tp, cfg.decode_tp)
    num_bytes = sum(initiator.part_bytes(cfg, a) for a in mapping.assignments)
    descriptors = direct_descriptors(cfg, session.hellos)
    writes = (False, True) if cfg.mode is StrategyChoice.AUTO else (cfg.mode is StrategyChoice.WRITE,)
    # the bench stages only WRITEs (the receiver's buffer is the target)
    allowed = tuple((Path.DIRECT, w) for w in writes) + ((Path.STAGED, True),) * (True in writes)
    choice = choose(costs, num_bytes=num_bytes, descriptors=descriptors, allowed=allowed)
    best = choice.best
    kind = PlanKind.STAGED if best.path is Path.STAGED else PlanKind.PREPPED
    log.info("cost model: %s", choice.describe())
    report = {"costs": asdict(costs),
              "direct_descriptors": descriptors, "bytes": num_bytes,
              "estimates_ms": {f"{c.path.value}/{'write' if c.write else 'read'}": c.seconds * 1e3
                               for c in choice.candidates},
              "choice": f"{best.path.value}/{'write' if best.write else 'read'}"}
    return kind, Strategy.WRITE if best.write else Strategy.READ, report


def direct_descriptors(cfg: BenchConfig, hellos: list[Hello]) -> int:
    """Descriptors the prepped (direct) plan posts for the request, over every decode rank."""
    by_key = {(h.info.role, h.info.tp_rank): h for h in hellos}
    total = 0
    for a in map_tp(cfg.kv_heads, cfg.prefill_tp, cfg.decode_tp).assignments:
        d, p = by_key[Role.DECODE, a.decode_rank], by_key[Role.PREFILL, a.prefill_rank]
        infos = [h.info.regions[0] for h in (d, p)]
        regions = [CacheRegion(i.desc, np.array(i.layer_addrs, dtype=np.uint64), i.device_id) for i in infos]
        ids = [np.array(h.block_ids, dtype=np.int64).reshape((2, -1) if i.desc.separate_kv_pages else (-1,))
               for h, i in zip((d, p), infos, strict=True)]
        plan = pair(regions[0], regions[1], a.heads, fallback=Fallback(cfg.fallback))
        total += int(request_indices(plan, ids[0], ids[1], cfg.tokens)[0].size)
    return total


def run_bench(cfg: BenchConfig) -> BenchResult:
    with BenchSession(cfg) as session:
        rtt_us = statistics.median(session.ping_pong(NUM_PINGS))
        auto = cost_model = None
        kind = cfg.plan
        if cfg.plan is PlanKind.AUTO:
            kind, strategy, cost_model = choose_plan(session, cfg)
            # Every candidate measured in this session, so the choice can be checked against them.
            candidates = {PlanKind.STAGED: Strategy.WRITE, PlanKind.PREPPED: strategy,
                          PlanKind.PER_BLOCK: strategy}
            measured = {k.value: measure(session, s, AUTO_ITERS, kind=k)[0].gbps for k, s in candidates.items()}
            cost_model["measured_gbps"] = measured
            cost_model["picked_faster"] = measured[kind.value] >= max(measured[PlanKind.STAGED.value],
                                                                     measured[PlanKind.PREPPED.value])
        elif (fixed := cfg.mode.fixed()) is None:
            gbps = {s: measure(session, s, AUTO_ITERS)[0].gbps for s in Strategy}
            strategy = max(gbps, key=gbps.__getitem__)
            auto = {s.value: g for s, g in gbps.items()}
        else:
            strategy = fixed
        figures, last = measure(session, strategy, cfg.iters, verify_last=cfg.verify,
                                snapshot=cfg.dump is not None, baseline=cfg.memcpy, kind=kind)
        if cost_model is not None:  # the yardstick: the chosen plan against per-block posts
            cost_model["speedup_over_per_block"] = figures.gbps / cost_model["measured_gbps"][PlanKind.PER_BLOCK.value]
        verified = None
        if cfg.verify:
            verified, detail = session.verify()
            if not verified:
                raise TransferError(f"bench: verification failed: {detail}")
        if cfg.dump is not None:
            session.dump(cfg.dump)
    return BenchResult(
        mode=strategy.value, plan=kind.value, prefill_tp=cfg.prefill_tp,
        decode_tp=cfg.decode_tp, device=cfg.device, threading=cfg.threading,
        error_handling=cfg.error_handling, huge_pages=cfg.huge_pages,
        num_workers=cfg.num_workers, num_threads=cfg.num_threads, bytes=last.num_bytes, descriptors=last.num_descriptors,
        nixl_descriptors=last.nixl_descriptors, num_transfers=last.num_transfers,
        plan_us=last.plan_us, post_us=last.post_us, transfer_ms=figures.transfer_ms,
        gbps=figures.gbps, memcpy_gbps=figures.memcpy_gbps, ratio=figures.ratio,
        verified=verified, notif_rtt_us=rtt_us, iters=cfg.iters, transfer_ms_all=figures.transfer_ms_all,
        ratio_all=figures.ratio_all, auto=auto, cost_model=cost_model, phases_ms=figures.phases_ms,
        gpu_sharing=gpu_sharing() if cfg.device == "cuda" else "")


def gpu_sharing() -> str:
    """How the ranks' processes share a GPU: "mps" when an MPS control daemon listens where
    CUDA clients look for it (`CUDA_MPS_PIPE_DIRECTORY`, default /tmp/nvidia-mps), else
    "time-sliced" (each process its own context; one GPU runs one context at a time). On one
    H200, decode TP 2 moves 1 GiB at ~500 GB/s time-sliced and ~610 GB/s under MPS."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return "mps" if os.path.exists(os.path.join(pipe_dir, "control")) else "time-sliced"
