"""One bench rank (a spawned process): owns a cache and a NIXL agent, obeys the coordinator.

Every reply goes back over the pipe; a KvxferError becomes a `Failed` message instead of a
traceback, so the coordinator can raise the same kind of error."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from multiprocessing.connection import Connection

import msgspec
import torch

from kvxfer.agents.calibrate import SMALL_PROBE_BYTES, Probe, calibrate, num_small_probes
from kvxfer.agents.nixl_agent import (
    AgentConfig,
    ErrorHandling,
    MemKind,
    NixlAgent,
    Op,
    Threading,
    quiet_nixl_logs,
)
from kvxfer.bench import cache as cache_mod
from kvxfer.bench import initiator, staged
from kvxfer.bench.config import BenchConfig, PlanKind, Strategy
from kvxfer.bench.messages import (
    ENCODER,
    TO_RANK,
    Ack,
    Calibrate,
    Calibrated,
    Deliver,
    Dump,
    Failed,
    Hello,
    Latency,
    Peers,
    PingPong,
    Prepare,
    Run,
    RunReport,
    Scramble,
    Stop,
    Verified,
    Verify,
)
from kvxfer.deadline import Deadline
from kvxfer.errors import ConfigError, KvxferError
from kvxfer.planning import map_tp

log = logging.getLogger(__name__)
IDLE_PROGRESS_S = 0.001


class RankState:
    def __init__(self, cfg: BenchConfig, role: str, rank: int) -> None:
        self.cfg = cfg
        self.cache = cache_mod.make_cache(cfg, role, rank)
        if role == "prefill":
            cache_mod.fill_prefill(cfg, self.cache)
        else:
            cache_mod.scramble(self.cache)
        self.agent = NixlAgent(AgentConfig(
            name=f"{role}{rank}", threading=Threading(cfg.threading),
            error_handling=ErrorHandling(cfg.error_handling), num_workers=cfg.num_workers,
            num_threads=cfg.num_threads))
        self.mem = self.agent.register(self.cache.tensors)
        self.staging = None
        if cfg.plan in (PlanKind.STAGED, PlanKind.AUTO):
            # staging: [bytes this rank sends or receives per request] uint8, registered once
            self.staging = torch.empty(staged.staging_bytes(cfg, role, rank), dtype=torch.uint8,
                                       device=self.cache.tensors[0].device)
            self.agent.register([self.staging])
        self.staged_received = False
        self.staged_pairs: list[staged.PeerPair] = []
        self.staged_groups: list[range] = []
        self.hellos: list[Hello] = []
        self.plans: dict[tuple[Op, PlanKind], list[initiator.PeerPlan]] = {}
        self.before = None

    def hello(self) -> Hello:
        c = self.cache
        return Hello(role=c.role, rank=c.rank, agent=self.agent.name, metadata=self.agent.metadata(),
                     desc=c.desc, layer_addrs=[int(a) for a in c.region.layer_addrs],
                     device_id=c.region.device_id, mem=self.mem.value,
                     block_ids=[int(b) for b in c.block_ids.reshape(-1)],
                     staging_addr=0 if self.staging is None else int(self.staging.data_ptr()))

    def handle(self, msg: object) -> object:
        match msg:
            case Peers(hellos=hellos):
                return self._peers(hellos)
            case Prepare(ops=ops, plan=kind):
                if kind is PlanKind.STAGED:
                    # pairings once per peer; gather/scatter indices per request (timed in Run)
                    self.staged_pairs = staged.pair_peers(self.cfg, self.cache, self.hellos, self.staging)
                    self.staged_groups = staged.groups(self.cfg.layers, staged.num_groups(self.cfg, self.hellos))
                    return Ack()
                for op in ops:
                    self.plans[op, kind] = initiator.build(self.cfg, self.agent, op, kind, self.cache,
                                                           self.hellos)
                return Ack()
            case Scramble(snapshot=snap):
                if self.cache.role == "decode":
                    cache_mod.scramble(self.cache)
                self.before = cache_mod.snapshot(self.cache) if snap else None
                return Ack()
            case Run(strategy=strategy, plan=kind):
                return self._run(strategy, kind)
            case Deliver(strategy=strategy):
                return self._deliver(strategy)
            case PingPong(count=count):
                return self._ping_pong(count)
            case Verify():
                if self.cache.role != "decode":
                    return Verified(ok=True, detail="", num_bytes=0)
                ok, detail, num_bytes = cache_mod.verify(self.cfg, self.cache)
                return Verified(ok=ok, detail=detail, num_bytes=num_bytes)
            case Calibrate(probe_bytes=probe_bytes):
                return self._calibrate(probe_bytes)
            case Dump(directory=directory):
                cache_mod.dump(directory, self.cache, self.before)
                return Ack()
        return Failed(kind="config", message=f"unexpected message {type(msg).__name__}")

    def _peers(self, hellos: list[Hello]) -> Ack:
        self.hellos = hellos
        for h in hellos:
            if h.role != self.cache.role:
                self.agent.add_peer(h.metadata)
        for h in hellos:
            if h.role != self.cache.role:
                self.agent.connect(h.agent)
        return Ack()

    def _run(self, strategy: Strategy, kind: PlanKind) -> RunReport:
        if kind is PlanKind.STAGED:
            return self._run_staged(strategy)
        op, half = _my_part(strategy, self.cache.role)
        plans = self.plans.get((op, kind), [])
        if not plans:
            return RunReport()
        start = time.monotonic_ns()
        posted = initiator.post_all(self.cfg, self.agent, op, kind, self.cache, plans, half=half,
                                    notif=b"" if op is Op.READ else ENCODER.encode(strategy))
        num_bytes = sum(x.num_bytes for x in posted.transfers)
        timeout = Deadline(self.cfg.deadline_slack_s, self.cfg.expected_gbps).seconds(num_bytes)
        stats = self.agent.wait(posted.transfers, timeout_s=timeout)
        end = time.monotonic_ns()
        return RunReport(
            start_ns=start, end_ns=end, num_bytes=num_bytes,
            num_descriptors=sum(x.num_descriptors for x in posted.transfers),
            nixl_descriptors=sum(s.num_descriptors for s in stats),
            num_transfers=len(posted.transfers), post_us=max(s.post_us for s in stats),
            plan_us=posted.plan_us)

    def _run_staged(self, strategy: Strategy) -> RunReport:
        """Prefill: gather, one WRITE per decode rank. Decode: wait, scatter (timed end)."""
        if strategy is not Strategy.WRITE or self.staging is None:
            raise ConfigError("bench: --plan staged pushes (--mode write) from a registered staging buffer")
        start = time.monotonic_ns()
        sender = self.cache.role == "prefill"
        first = self.staged_groups[0] if sender else None
        parts = staged.build_parts(self.cfg, self.cache, self.staged_pairs, self.staging, launch=first)
        phases = {"indexed": time.monotonic_ns()}
        plan_us = (phases["indexed"] - start) / 1e3
        if self.cache.role == "decode":
            end = staged.receive(self.agent, self.cache, parts, self.staging, layer_groups=self.staged_groups,
                                 timeout_s=self.cfg.deadline_slack_s, phases=phases)
            self.staged_received = True
            return RunReport(receive_end_ns=end, phases_ns=phases | {"scattered": end})
        if not parts:  # a prefill replica whose heads another replica sends
            return RunReport()
        transfers = staged.send(self.agent, self.cache, parts, self.staging, layer_groups=self.staged_groups,
                                rank=self.cache.rank, phases=phases)
        num_bytes = sum(x.num_bytes for x in transfers)
        timeout = Deadline(self.cfg.deadline_slack_s, self.cfg.expected_gbps).seconds(num_bytes)
        stats = self.agent.wait(transfers, timeout_s=timeout)
        phases["written"] = time.monotonic_ns()
        return RunReport(start_ns=start, end_ns=phases["written"], num_bytes=num_bytes, phases_ns=phases,
                         num_descriptors=len(transfers), nixl_descriptors=sum(s.num_descriptors for s in stats),
                         num_transfers=len(transfers), post_us=max(s.post_us for s in stats), plan_us=plan_us)

    def _calibrate(self, probe_bytes: int) -> Ack | Calibrated:
        """prefill0 probes decode0's staging buffer; every other rank idles (and progresses)."""
        if (self.cache.role, self.cache.rank) != ("prefill", 0) or self.staging is None:
            return Ack()
        peer = next(h for h in self.hellos if (h.role, h.rank) == ("decode", 0))
        probe = Probe(self.staging.data_ptr(), peer.staging_addr, self.cache.region.device_id, peer.device_id,
                      self.mem, MemKind(peer.mem), peer.agent)
        costs = calibrate(self.agent, probe, self.staging.device, probe_bytes=probe_bytes,
                          small_bytes=SMALL_PROBE_BYTES, num_small=num_small_probes(probe_bytes, most=1024))
        return Calibrated(**dataclasses.asdict(costs))

    def _deliver(self, strategy: Strategy) -> Ack:
        """After a WRITE (or SPLIT) the decode rank waits for each producer's notification."""
        if self.staged_received:  # a staged run consumed its notifications already
            self.staged_received = False
            return Ack()
        if strategy is not Strategy.READ and self.cache.role == "decode":
            mapping = map_tp(self.cfg.kv_heads, self.cfg.prefill_tp, self.cfg.decode_tp)
            expected = len(mapping.sources_of(self.cache.rank))
            self.agent.wait_notifs(expected, timeout_s=self.cfg.deadline_slack_s)
        return Ack()

    def _ping_pong(self, count: int) -> Ack | Latency:
        """Notification round trips between decode0 and prefill0 (NIXL's own messages)."""
        peer = {h.role: h.agent for h in self.hellos if h.rank == 0}
        timeout = self.cfg.deadline_slack_s
        if self.cache.rank != 0:
            return Ack()
        if self.cache.role == "prefill":
            for _ in range(count):
                self.agent.wait_notifs(1, timeout_s=timeout)
                self.agent.send_notif(peer["decode"], b"pong")
            return Ack()
        rtt = []
        for _ in range(count):
            t0 = time.perf_counter()
            self.agent.send_notif(peer["prefill"], b"ping")
            self.agent.wait_notifs(1, timeout_s=timeout)
            rtt.append((time.perf_counter() - t0) * 1e6)
        return Latency(rtt_us=rtt)

    def close(self) -> None:
        self.agent.close()


def _my_part(strategy: Strategy, role: str) -> tuple[Op, initiator.Half]:
    """The op this role initiates under `strategy`, and on which half of the descriptors."""
    if strategy is Strategy.SPLIT:
        return (Op.READ, initiator.Half.FIRST) if role == "decode" else (Op.WRITE, initiator.Half.SECOND)
    return (Op.READ if strategy is Strategy.READ else Op.WRITE), initiator.Half.ALL


def main(conn: Connection, config: bytes, role: str, rank: int) -> None:
    """Entry point of a spawned rank process."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {role}{rank} %(levelname)s %(name)s: %(message)s")
    quiet_nixl_logs()
    cfg = msgspec.msgpack.decode(config, type=BenchConfig)
    state = None
    try:
        state = RankState(cfg, role, rank)
        conn.send_bytes(ENCODER.encode(state.hello()))
        while True:
            while not conn.poll(IDLE_PROGRESS_S):
                state.agent.progress()  # peers connecting to us need us to progress
            msg = TO_RANK.decode(conn.recv_bytes())
            if isinstance(msg, Stop):
                break
            try:
                reply = state.handle(msg)
            except KvxferError as err:
                reply = Failed(kind=err.kind, message=str(err))
            conn.send_bytes(ENCODER.encode(reply))
    except KvxferError as err:
        conn.send_bytes(ENCODER.encode(Failed(kind=err.kind, message=str(err))))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        if state is not None:
            state.close()
    # Everything is released and every reply sent; skip interpreter teardown (torch and UCX
    # finalizers take seconds) so a bench or test does not wait for it.
    conn.close()
    os._exit(0)
