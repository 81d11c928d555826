"""A READ given up at its deadline while the link is down still lands once the link is back
(NIXL cannot cancel it: docs/two-hosts.md). The consumer role must say so, and keep saying so until
the transfer has ended: its driver gives the blocks back only then. Without that, the blocks went
to the next request and the late bytes overwrote its KV (what the vLLM two-host test first saw).

The producer and the consumer role run in their own processes on the two hosts (role_process.py),
UCX over TCP between them as between nodes without RDMA."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvxfer.ports import free_ports

pytestmark = pytest.mark.timeout(180)
SCRIPT = Path(__file__).with_name("role_process.py")


class RoleProcess:
    """A role_process.py on one host; `ask` writes a line and returns the next reply."""

    def __init__(self, host, *args: str) -> None:
        env = {**os.environ, **dict(host.env), "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen(host.command([sys.executable, str(SCRIPT), *args]), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.next(timeout_s=60).get("ready"), "the role did not start"

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def next(self, *, timeout_s: float) -> dict:
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no reply from {self.proc.args[-1]} within {timeout_s} s") from None

    def ask(self, obj: dict, *, timeout_s: float = 30.0) -> dict:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        return self.next(timeout_s=timeout_s)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def roles(topology):
    prefill = topology.host("prefill")
    producer = RoleProcess(prefill, "producer", prefill.address, str(free_ports(1)))
    consumer = RoleProcess(topology.host("decode"), "consumer")
    yield producer, consumer
    consumer.close()
    producer.close()


def test_a_read_given_up_during_a_partition_keeps_its_blocks_until_it_has_ended(topology, roles):
    producer, consumer = roles
    warm = consumer.ask({"params": producer.ask({"hold": [3], "num_tokens": 16})["params"], "local": [5]})
    assert warm["holds"] == [4.0], warm  # handshaken, connected, the bytes of producer block 3

    params = producer.ask({"hold": [7, 8], "num_tokens": 32})["params"]
    with topology.partitioned("prefill"):
        failed = consumer.ask({"params": params, "local": [10, 11]}, timeout_s=60)
        assert failed["failed"] in ("timeout", "peer_gone"), failed
        assert failed["landing"], "the READ still runs in UCX, but the consumer called its blocks free"
        with pytest.raises(AssertionError):  # nothing can end it while the link is down
            consumer.next(timeout_s=1.0)
    settled = consumer.next(timeout_s=90)
    assert settled["settled"] == params["request_id"], settled
    # What made the blocks unsafe: the late bytes did arrive, after the failure was reported.
    assert not settled["unchanged_since_failure"] and settled["holds"] == [8.0, 9.0], settled
