"""The fault injector: its own seeded random choices, spread over the load's progress.

Fault i is due once the load has sent i * num_requests / (num_faults + 1) requests; before it
strikes, the injector waits for every service to be ready (so each fault meets a working
deployment, and a restart is not mistaken for the next fault's effect). Every fault is recorded:
when, what, on which process, and what it did.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvxfer.hosts.netns import pid_alive as alive
from kvxfer.soak import config as c
from kvxfer.soak.procs import rank_pids
from kvxfer.soak.relay import SideChannelRelay
from kvxfer.soak.supervisor import Supervisor

if TYPE_CHECKING:
    from kvxfer.hosts import Topology

from kvxfer.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaultEvent:
    at_s: float  # seconds since the load started
    kind: str
    target: str  # e.g. "decode0 rank 2 (pid 1234)"
    detail: str = ""


class FaultInjector:
    def __init__(self, config: c.SoakConfig, supervisor: Supervisor, relay: SideChannelRelay | None,
                 progress: Callable[[], int], started: float, topology: Topology | None = None) -> None:
        self.config = config
        self.supervisor = supervisor
        self.relay = relay  # loopback: resets go through the relay
        self.topology = topology  # hosts: resets from inside prefill's host, and link faults
        self.progress = progress  # requests sent so far
        self.started = started
        self.rng = random.Random(config.fault_seed)
        self.events: list[FaultEvent] = []
        self.skipped = 0  # due faults not injected because the deployment never became ready
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvxfer-soak-faults", daemon=True)
        self._actions: dict[str, Callable[[], FaultEvent]] = {
            c.KILL_PREFILL_RANK: lambda: self._kill_rank("prefill0"),
            c.KILL_DECODE_RANK: lambda: self._kill_rank("decode0"),
            c.RESTART_SERVICE: self._restart,
            c.PAUSE_RANK: self._pause,
            c.DROP_SIDE_CHANNEL: self._drop,
            c.LINK_DOWN: self._link_down,
        }

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.config.transfer_deadline_s + 60.0)

    @property
    def min_gap(self) -> int:
        """Requests the deployment serves after recovering before the next fault may strike."""
        return max(1, self.config.num_requests // (self.config.num_faults + 1) // 4)

    def _due(self, index: int) -> int:
        return index * self.config.num_requests // (self.config.num_faults + 1)

    def _loop(self) -> None:
        kinds = [k for k, w in self.config.weights.items() if w > 0]
        weights = [self.config.weights[k] for k in kinds]
        resumed_at = 0  # requests sent when the deployment was last seen ready after a fault
        for index in range(1, self.config.num_faults + 1):
            while self.progress() < max(self._due(index), resumed_at + self.min_gap):
                if self._stop.wait(0.2):
                    return
            if not self.supervisor.wait_ready(self.supervisor.names, self.config.ready_timeout_s, self._stop):
                if self._stop.is_set():
                    return
                self.skipped += 1
                log.error("fault %d skipped: services not ready after %.0f s", index, self.config.ready_timeout_s)
                continue
            if self._stop.is_set():
                return
            kind = self.rng.choices(kinds, weights)[0]
            try:
                event = self._actions[kind]()
            except OSError as err:  # the chosen process exited between the lookup and the signal
                event = FaultEvent(self._now(), kind, "(target gone)", f"{type(err).__name__}: {err}")
            self.events.append(event)
            log.warning("fault %d/%d at %.1f s: %s on %s %s", index, self.config.num_faults, event.at_s,
                        event.kind, event.target, event.detail)
            self.supervisor.wait_ready(self.supervisor.names, self.config.ready_timeout_s, self._stop)
            resumed_at = self.progress()

    def _now(self) -> float:
        return time.monotonic() - self.started

    def _ranks(self, name: str) -> list[int]:
        proc = self.supervisor.cluster.by_name(name).proc
        return rank_pids(proc.pid) if proc is not None else []

    def _kill_rank(self, name: str) -> FaultEvent:
        """SIGKILL one rank process; the service exits by design and the supervisor restarts it."""
        kind = c.KILL_PREFILL_RANK if name.startswith("prefill") else c.KILL_DECODE_RANK
        with self.supervisor.lock:
            pids = self._ranks(name)
            rank = self.rng.randrange(len(pids))
            os.kill(pids[rank], signal.SIGKILL)
        return FaultEvent(self._now(), kind, f"{name} rank {rank} (pid {pids[rank]})",
                          f"{len(pids)} rank processes")

    def _restart(self) -> FaultEvent:
        name = self.rng.choice(self.supervisor.names)
        self.supervisor.relaunch(name)
        return FaultEvent(self._now(), c.RESTART_SERVICE, name, "SIGTERM, then started again")

    def _pause(self) -> FaultEvent:
        """SIGSTOP one rank past the transfer deadline, then SIGCONT (always)."""
        name = self.rng.choice(self.supervisor.names)
        pids = self._ranks(name)
        rank = self.rng.randrange(len(pids))
        seconds = self.config.transfer_deadline_s + self.rng.uniform(1.0, 3.0)
        at = self._now()
        os.kill(pids[rank], signal.SIGSTOP)
        try:
            self._stop.wait(seconds)
        finally:
            if alive(pids[rank]):
                os.kill(pids[rank], signal.SIGCONT)
        return FaultEvent(at, c.PAUSE_RANK, f"{name} rank {rank} (pid {pids[rank]})", f"stopped {seconds:.1f} s")

    def _drop(self) -> FaultEvent:
        if self.topology is not None:
            prefill = self.supervisor.cluster.by_name("prefill0")
            dropped = self.topology.reset_connections(
                "prefill", ports=range(prefill.side_port, prefill.side_port + prefill.spec.tp))
            return FaultEvent(self._now(), c.DROP_SIDE_CHANNEL, "prefill0 side channel (all ranks)",
                              f"{dropped} connections reset from inside the prefill host (ss -K)")
        relay = self.relay
        if relay is None:
            raise ConfigError("drop_side_channel on one host needs the soak's side-channel relay")
        dropped = relay.drop_all()
        return FaultEvent(self._now(), c.DROP_SIDE_CHANNEL, "prefill0 side channel (all ranks)",
                          f"{dropped} sockets reset ({relay.num_relayed} connections relayed so far)")

    def _link_down(self) -> FaultEvent:
        """The prefill host's link down for 1 s to max_link_down_s, then up (always): a partition
        that may strike a handshake, a transfer, a held lease or the proxy's prefill leg."""
        if self.topology is None:
            raise ConfigError("link_down needs two hosts (kvxfer soak --hosts 2)")
        seconds = self.rng.uniform(1.0, self.config.max_link_down_s)
        at, sent = self._now(), self.progress()
        with self.topology.partitioned("prefill"):
            self._stop.wait(seconds)
        return FaultEvent(at, c.LINK_DOWN, "prefill <-> decode hosts",
                          f"down {seconds:.1f} s (request {sent} sent when it went down)")
