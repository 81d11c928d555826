"""The worker processes of `test_connector_blocks.py`: vLLM's caches (cache_cases) under the
connector's own worker half (`WorkerSide`), driven over a pipe the way vLLM drives it: the jobs
the scheduler half made, then `get_finished`-style polling of what ended. One process per role:
producers and consumers are separate processes, but the ranks of one instance share one (each
process pays for importing vLLM, which the worker half needs, and a pair of TP ranks in one
process changes nothing about block ids)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from cache_cases import TOTAL_HEADS, Case, Prepared, Recipe, check_request, prepare, source_of

from kvxfer.integrations.vllm.config import parse_config
from kvxfer.integrations.vllm.worker import RankInfo, Results, WorkerSide

WAIT_S = 60.0  # what ended must end by then (a load here takes milliseconds)
FINGERPRINT = "tiny-test"  # both instances run "the same model"


@dataclass(frozen=True)
class Instance:
    """What the scheduler and every worker of one vLLM instance share."""

    role: str  # "kv_producer" / "kv_consumer"
    engine_id: str
    boot_epoch: int
    tp_size: int
    extra: dict[str, Any] = field(default_factory=dict)  # kv_connector_extra_config

    def config(self):
        return parse_config(dict(self.extra), role=self.role, engine_id=self.engine_id,
                            default_fingerprint=FINGERPRINT)


@dataclass(frozen=True)
class Member:
    """One worker of one instance, in one test pair."""

    pair: int
    instance: Instance
    tp_rank: int
    case: Case
    recipe: Recipe | None


def rank_main(conn, members: list[Member]) -> None:
    """Host `members` (every worker of one role, each with its own endpoint and NIXL agent) and
    do what the pipe says to a pair's workers, rank by rank."""
    logging.basicConfig(level=logging.INFO, format="%(processName)s %(name)s %(message)s")
    workers = {(m.pair, m.tp_rank): _worker(m) for m in members}
    conn.send({key: worker.blocks for key, (worker, _) in workers.items()})  # get_handshake_metadata's
    ended = {key: Results() for key in workers}
    decode = members[0].instance.role == "kv_consumer"  # one role per process
    while (msg := conn.recv()) != "stop":
        kind, pair, payload = msg
        ranks = sorted(key for key in workers if key[0] == pair)
        if kind == "submit":
            for key in ranks:
                workers[key][0].submit(*payload, [])
            conn.send("submitted")
        else:  # "wait": until these requests ended (sent / received), then what each rank sees
            for key in ranks:
                _collect(workers[key][0], ended[key], payload, sending=not decode)
            conn.send([(ended[key], check_request(0, workers[key][1]) if decode else "") for key in ranks])
    for worker, _ in workers.values():
        worker.shutdown()
    conn.close()
    os._exit(0)  # skip interpreter teardown (torch and UCX finalizers take seconds)


def _worker(m: Member) -> tuple[WorkerSide, Prepared]:
    role = "prefill" if m.instance.role == "kv_producer" else "decode"
    prepared = prepare(0, m.case, role, m.instance.tp_size, m.tp_rank, m.recipe)
    worker = WorkerSide(m.instance.config(), RankInfo(tp_size=m.instance.tp_size, tp_rank=m.tp_rank,
                                                      total_kv_heads=TOTAL_HEADS, boot_epoch=m.instance.boot_epoch,
                                                      cache=source_of(prepared.side)))
    worker.register(prepared.kv_caches)
    return worker, prepared


def _collect(worker: WorkerSide, ended: Results, req_ids: set[str], *, sending: bool) -> None:
    deadline = time.monotonic() + WAIT_S
    while not req_ids <= (ended.sending if sending else ended.recving) and time.monotonic() < deadline:
        results = worker.transfer_results()
        ended.sending |= results.sending
        ended.recving |= results.recving
        ended.failed |= results.failed
        ended.failed_blocks |= results.failed_blocks
        time.sleep(0.005)
