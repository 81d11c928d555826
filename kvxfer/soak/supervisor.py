"""A supervisor for the soak's services, as Kubernetes is in production: a service whose process
exited (a rank died and it stopped by design, or it crashed) is started again, and counted.

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


class Supervisor:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.names = [s.name for s in cluster.services]
        self.restarts: Counter[str] = Counter()  # by service: exits the supervisor restarted
        self.exit_codes: Counter[int] = Counter()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvxfer-soak-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30.0)

    def relaunch(self, name: str) -> None:
        with self.lock:
            self.cluster.relaunch(name)

    def ready(self, name: str) -> bool:
        try:
            return httpx.get(f"{self.cluster.by_name(name).url}/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, names: list[str], timeout_s: float) -> bool:
        """True once every named service is ready; False after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if all(self.ready(n) for n in names):
                return True
            time.sleep(POLL_S)
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
