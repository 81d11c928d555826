"""One bench rank (a spawned process): owns a cache and the production transfer `Endpoint` over
it, and serves the coordinator's commands through the daemons' bus loop (`serve_commands`: a
KvxferError becomes a `Failed` reply, the coordinator raises the same kind again)."""

from __future__ import annotations

import logging
import os
import time
from multiprocessing.connection import Connection

import msgspec
import numpy as np
import torch

from kvxfer.agents.endpoint import Endpoint, Identity, Leg
from kvxfer.agents.messages import Role
from kvxfer.agents.metrics import Stats, TransferMetrics
from kvxfer.agents.nixl_agent import AgentConfig, ErrorHandling, Op, Threading, quiet_nixl_logs
from kvxfer.agents.staged_transfer import Reservation, StagingConfig
from kvxfer.bench import cache as cache_mod
from kvxfer.bench import initiator, staged
from kvxfer.bench.config import BenchConfig, PlanKind, Strategy
from kvxfer.bench.messages import (
    ENCODER,
    TO_RANK,
    Ack,
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
from kvxfer.daemons.bus import Failed, serve_commands
from kvxfer.deadline import Deadline
from kvxfer.errors import ConfigError, KvxferError
from kvxfer.planning import Fallback, map_tp

log = logging.getLogger(__name__)
NOTIF = b"bench"


class RunStats(TransferMetrics):
    """The endpoint's metrics, also keeping each completed transfer's NIXL telemetry so a run
    can report what it posted and how NIXL merged it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Stats] = []

    def observe_transfer(self, op: str, stats: Stats) -> None:
        super().observe_transfer(op, stats)
        self.seen.append(stats)


class RankState:
    def __init__(self, cfg: BenchConfig, role: Role, rank: int) -> None:
        self.cfg = cfg
        self.mapping = map_tp(cfg.kv_heads, cfg.prefill_tp, cfg.decode_tp)
        self.cache = cache_mod.make_cache(cfg, role, rank)
        if role is Role.PREFILL:
            cache_mod.fill_prefill(cfg, self.cache)
        else:
            cache_mod.scramble(self.cache)
        self.stats = RunStats()
        self.endpoint = Endpoint(
            Identity(engine_id=f"bench-{role.value}", boot_epoch=time.time_ns(), role=role,
                     tp_size=cfg.prefill_tp if role is Role.PREFILL else cfg.decode_tp, tp_rank=rank,
                     model_fingerprint="bench"),
            self.cache.tensors, self.cache.desc,
            agent_config=AgentConfig(name=f"{role.value}{rank}", threading=Threading(cfg.threading),
                                     error_handling=ErrorHandling(cfg.error_handling),
                                     num_workers=cfg.num_workers, num_threads=cfg.num_threads),
            fallback=Fallback(cfg.fallback), deadline=Deadline(cfg.deadline_slack_s, cfg.expected_gbps),
            metrics=self.stats, staging=self._staging(role, rank))
        self.block_ids = self.cache.block_ids.reshape(-1)  # flat, as shaped_ids takes them
        self.remotes: dict[tuple[Role, int], initiator.Remote] = {}
        self.reservation: Reservation | None = None
        self.before: list[torch.Tensor] | None = None

    def _staging(self, role: Role, rank: int) -> StagingConfig | None:
        """The slots for what this rank stages per request (--plan staged/auto), else none."""
        if self.cfg.plan not in (PlanKind.STAGED, PlanKind.AUTO):
            return None
        slot_bytes, num_slots = initiator.staging_slots(self.cfg, role, rank)
        return StagingConfig(slot_bytes=slot_bytes, num_slots=num_slots if slot_bytes else 0,
                             max_tokens=self.cfg.tokens)

    @property
    def role(self) -> Role:
        return self.cache.role

    def hello(self) -> Hello:
        return Hello(info=self.endpoint.info(), block_ids=[int(b) for b in self.block_ids])

    def handle(self, msg: object) -> msgspec.Struct:
        match msg:
            case Peers(hellos=hellos):
                return self._peers(hellos)
            case Scramble(snapshot=snap):
                if self.role is Role.DECODE:
                    cache_mod.scramble(self.cache)
                self.before = cache_mod.snapshot(self.cache) if snap else None
                return Ack()
            case Reserve():
                return self._reserve()
            case Run(strategy=strategy, plan=kind, staging_offsets=offsets):
                if kind is PlanKind.STAGED:
                    return self._run_staged(strategy, offsets)
                return self._run(strategy, kind)
            case PingPong(count=count):
                return self._ping_pong(count)
            case Verify():
                if self.role is not Role.DECODE:
                    return Verified(ok=True, detail="", num_bytes=0)
                ok, detail, num_bytes = cache_mod.verify(self.cfg, self.cache)
                return Verified(ok=ok, detail=detail, num_bytes=num_bytes)
            case Calibrate():
                return self._calibrate()
            case Dump(directory=directory):
                cache_mod.dump(directory, self.cache, self.before)
                return Ack()
        raise ConfigError(f"bench rank: unexpected message {type(msg).__name__}")

    def _peers(self, hellos: list[Hello]) -> Ack:
        """Admit every rank of the other role, as the daemons do at handshake, and connect."""
        for h in hellos:
            if h.info.role is not self.role:
                peer = self.endpoint.peers.admit(h.info)
                self.remotes[peer.info.role, peer.rank] = initiator.Remote(
                    peer, np.array(h.block_ids, dtype=np.int64))
        for r in self.remotes.values():
            self.endpoint.agent.connect(r.peer.agent_name)
        return Ack()

    def _full(self) -> initiator.Share:
        return initiator.Share(0, self.cfg.tokens)

    def _run(self, strategy: Strategy, kind: PlanKind) -> RunReport:
        """The direct path (or a baseline); decode ranks then wait for the WRITEs' notifications."""
        mine = initiator.share_of(self.cfg, strategy, self.role)
        report = RunReport()
        if mine is not None:
            op, share = mine
            legs = initiator.legs_of(self.cfg, self.cache, op, self.remotes, share)
            if legs:
                report = self._timed(kind, op, legs, share)
        if self.role is Role.DECODE and initiator.share_of(self.cfg, strategy, Role.PREFILL) is not None:
            self.endpoint.agent.wait_notifs(len(self.mapping.sources_of(self.cache.rank)),
                                            timeout_s=self.cfg.deadline_slack_s)
        return report

    def _timed(self, kind: PlanKind, op: Op, legs: list[Leg], share: initiator.Share) -> RunReport:
        """One run of this rank's legs, timed from the first post's planning to the last completion."""
        local_ids = initiator.request_ids(self.endpoint, self.block_ids, share)
        notif = b"" if op is Op.READ else NOTIF
        if kind is PlanKind.PREPPED:
            num_descriptors, plan_us = initiator.count_direct(self.endpoint, legs, local_ids, share.num_tokens)
        self.stats.seen.clear()
        start = time.monotonic_ns()
        if kind is PlanKind.PREPPED:
            num_bytes = initiator.run_direct(self.endpoint, op, legs, local_ids, share.num_tokens, notif=notif)
        else:
            num_bytes, num_descriptors, plan_us = initiator.run_baseline(
                self.endpoint, kind, op, legs, local_ids, share.num_tokens, notif=notif)
        end = time.monotonic_ns()
        return self._with_telemetry(RunReport(start_ns=start, end_ns=end, num_bytes=num_bytes,
                                              num_descriptors=num_descriptors, plan_us=plan_us))

    def _with_telemetry(self, report: RunReport) -> RunReport:
        """`report` with what NIXL reported for the transfers of the run that just ended."""
        seen = self.stats.seen
        return msgspec.structs.replace(report, nixl_descriptors=sum(s.num_descriptors for s in seen),
                                       num_transfers=len(seen), post_us=max((s.post_us for s in seen), default=0))

    def _reserve(self) -> Reserved:
        if self.role is not Role.DECODE:
            return Reserved()
        share = self._full()
        legs = initiator.legs_of(self.cfg, self.cache, Op.READ, self.remotes, share)
        self.reservation, seconds = staged.reserve(
            self.endpoint, legs, initiator.request_ids(self.endpoint, self.block_ids, share), share.num_tokens)
        return Reserved(offsets=self.reservation.wire_offsets(), seconds=seconds)

    def _run_staged(self, strategy: Strategy, offsets: dict[int, list[int]]) -> RunReport:
        """Prefill: gather and WRITE each part. Decode: wait, scatter (the end of the window)."""
        if strategy is not Strategy.WRITE:
            raise ConfigError("bench: --plan staged pushes (--mode write) into reserved staging slots")
        share = self._full()
        if self.role is Role.DECODE:
            reservation, self.reservation = self.reservation, None
            if reservation is None:
                raise ConfigError("bench staged: a run without a reservation")
            notified = staged.receive(self.endpoint, reservation, len(self.mapping.sources_of(self.cache.rank)))
            end = time.monotonic_ns()
            return RunReport(receive_end_ns=end, phases_ns={"notified": notified, "scattered": end})
        legs = initiator.legs_of(self.cfg, self.cache, Op.WRITE, self.remotes, share)
        if not legs:
            return RunReport()
        by_decode = {a.decode_rank: leg for a, leg in zip(self.mapping.targets_of(self.cache.rank), legs, strict=True)}
        self.stats.seen.clear()
        start = time.monotonic_ns()
        num_bytes = staged.send(self.endpoint, self.mapping, self.cache.rank, by_decode, offsets,
                                initiator.request_ids(self.endpoint, self.block_ids, share), share.num_tokens,
                                notif=NOTIF)
        end = time.monotonic_ns()
        return self._with_telemetry(RunReport(start_ns=start, end_ns=end, num_bytes=num_bytes,
                                              phases_ns={"written": end}, num_descriptors=len(self.stats.seen)))

    def _calibrate(self) -> Ack | Calibrated:
        """prefill0 probes decode0's staging probe area; every other rank idles (and progresses)."""
        if (self.role, self.cache.rank) != (Role.PREFILL, 0):
            return Ack()
        costs = self.endpoint.calibrate(self.remotes[Role.DECODE, 0].peer)
        if costs is None:
            raise ConfigError("bench: calibration needs staging on prefill0 and decode0 (--plan auto)")
        return Calibrated(per_transfer_s=costs.per_transfer_s, per_descriptor_s=costs.per_descriptor_s,
                          read_bytes_per_s=costs.read_bytes_per_s, write_bytes_per_s=costs.write_bytes_per_s,
                          copy_bytes_per_s=costs.copy_bytes_per_s)

    def _ping_pong(self, count: int) -> Ack | Latency:
        """Notification round trips between decode0 and prefill0 (NIXL's own messages)."""
        if self.cache.rank != 0:
            return Ack()
        agent, timeout = self.endpoint.agent, self.cfg.deadline_slack_s
        if self.role is Role.PREFILL:
            peer = self.remotes[Role.DECODE, 0].peer.agent_name
            for _ in range(count):
                agent.wait_notifs(1, timeout_s=timeout)
                agent.send_notif(peer, b"pong")
            return Ack()
        peer, rtt = self.remotes[Role.PREFILL, 0].peer.agent_name, []
        for _ in range(count):
            t0 = time.perf_counter()
            agent.send_notif(peer, b"ping")
            agent.wait_notifs(1, timeout_s=timeout)
            rtt.append((time.perf_counter() - t0) * 1e6)
        return Latency(rtt_us=rtt)

    def idle(self) -> bool:
        """Between commands: progress NIXL (peers connecting to us need it)."""
        self.endpoint.agent.progress()
        return False

    def close(self) -> None:
        self.endpoint.close()


def main(config: bytes, role: Role, rank: int, conn: Connection) -> None:
    """Entry point of a spawned rank process (`Bus.spawn`): build, say hello, serve commands
    until the coordinator closes the pipe."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {role.value}{rank} %(levelname)s %(name)s: %(message)s")
    quiet_nixl_logs()
    cfg = msgspec.msgpack.decode(config, type=BenchConfig)
    state = None
    try:
        state = RankState(cfg, role, rank)
        conn.send_bytes(ENCODER.encode(state.hello()))
        serve_commands(conn, state.handle, TO_RANK, ENCODER, state.idle)
    except KvxferError as err:
        conn.send_bytes(ENCODER.encode(Failed(kind=err.kind, message=str(err))))
    except KeyboardInterrupt:
        pass
    finally:
        if state is not None:
            state.close()
    # Everything is released and every reply sent; skip interpreter teardown (torch and UCX
    # finalizers take seconds) so a bench or test does not wait for it.
    conn.close()
    os._exit(0)
