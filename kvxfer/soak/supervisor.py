"""A supervisor for the soak's services, as Kubernetes is in production: a service whose process
exited (a rank died and it stopped by design, or it crashed) is started again, and counted. A
liveness probe as well: a service that answered /health once since it started and then fails it
LIVENESS_FAILURES times in a row is killed and started again (counted apart: each one is a
service that wedged instead of exiting, a bug to look at).

The fault injector restarts services through the same `Supervisor.relaunch`, under the same lock,
so the two never start a service twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import httpx

from kvxfer.daemons.cluster import LocalCluster

log = logging.getLogger(__name__)
POLL_S = 0.5
LIVENESS_PERIOD_S = 5.0
LIVENESS_FAILURES = 6


class Supervisor:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.names = [s.name for s in cluster.services]
        self.restarts: Counter[str] = Counter()  # by service: exits the supervisor restarted
        self.exit_codes: Counter[int] = Counter()
        self.liveness_kills: Counter[str] = Counter()
        self._failing: dict[str, int] = {}  # service -> consecutive /health failures
        self._alive_pid: dict[str, int] = {}  # service -> pid that answered /health
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvxfer-soak-supervisor", daemon=True)
        self._probe_thread = threading.Thread(target=self._probe_loop, name="kvxfer-soak-liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._probe_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30.0)
        self._probe_thread.join(30.0)

    def relaunch(self, name: str) -> None:
        with self.lock:
            self.cluster.relaunch(name)

    def ready(self, name: str) -> bool:
        try:
            return self.cluster.get(self.cluster.by_name(name), "/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, names: list[str], timeout_s: float, cancel: threading.Event | None = None) -> bool:
        """True once every named service is ready; False after `timeout_s` or on `cancel`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if all(self.ready(n) for n in names):
                return True
            if cancel is not None and cancel.wait(POLL_S):
                return False
            time.sleep(0 if cancel is not None else POLL_S)
        return False

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            for name in self.names:
                with self.lock:
                    code = self.cluster.exit_code(name)
                    if code is None:
                        continue
                    log.warning("supervisor: %s exited with %d; restarting it", name, code)
                    self.restarts[name] += 1
                    self.exit_codes[code] += 1
                    self.cluster.relaunch(name)

    def _probe_loop(self) -> None:
        while not self._stop.wait(LIVENESS_PERIOD_S):
            for name in self.names:
                self._probe(name)

    def _probe(self, name: str) -> None:
        proc = self.cluster.by_name(name).proc
        if proc is None or proc.poll() is not None:
            return
        try:
            healthy = self.cluster.get(self.cluster.by_name(name), "/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            self._alive_pid[name], self._failing[name] = proc.pid, 0
            return
        if self._alive_pid.get(name) != proc.pid:
            return  # still starting: no probe counts before the first answer (initialDelaySeconds)
        self._failing[name] = self._failing.get(name, 0) + 1
        if self._failing[name] >= LIVENESS_FAILURES:
            log.error("supervisor: %s (pid %d) failed /health %d times; killing and restarting it",
                      name, proc.pid, LIVENESS_FAILURES)
            with self.lock:
                self.liveness_kills[name] += 1
                self._failing[name] = 0
                self.cluster.relaunch(name)
