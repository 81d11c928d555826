"""vLLM blocks of several kernel blocks through the connector's own halves: vLLM 0.32 caches built
by `allocate_kv_cache` with kernel blocks smaller than vLLM's, the producers' and the consumers'
workers in two real processes (each `WorkerSide` with its own endpoint, NIXL agent, side channel
and protocol role), the two `SchedulerSide`s here, fed vLLM's own `Request` and `KVCacheBlocks`. Only vLLM's ids go in (the finished request's blocks,
the blocks vLLM allocated for the load); the workers hand the scheduler their block split as
vLLM's start-up channel would. Each decode rank then checks the K and V its backend reads, token
by token, at the kernel blocks vLLM's own block-table expansion gives; the producer ranks see
their leases end; a replayed load fails and reports vLLM's (manager) ids, not kernel ids.

Not a real vLLM server: vLLM's CPU backend always runs its own kernel block size (CPU_ATTN
takes any multiple of 32), so no CPU vLLM run has manager blocks larger than kernel blocks."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import uuid

import pytest
from cache_cases import NUM_TOKENS, Case, manager_ids, v32, vllm_recipe
from connector_ranks import Instance, Member, rank_main

from kvxfer.integrations.vllm.scheduler import SchedulerSide, boot_epoch_of
from kvxfer.ports import free_ports

pytestmark = [pytest.mark.timeout(300)]

PAIRS = [  # (prefill TP, decode TP), the two caches, mode
    ((1, 1), Case("kernel 16 of 64 -> 32", v32("LBHNC", 64, 16), v32("LBHNC", 32)), "read"),
    ((1, 2), Case("32 -> kernel 16 of 64", v32("LBHNC", 32), v32("LBHNC", 64, 16)), "write"),
    ((2, 1), Case("kernel 16 of 32 -> kernel 32 of 64", v32("LBHNC", 32, 16), v32("LBHNC", 64, 32)), "read"),
]


def _request(req_id: str, kv_transfer_params: dict, *, finished: bool = False):
    from vllm import SamplingParams
    from vllm.v1.request import Request, RequestStatus

    request = Request(req_id, list(range(NUM_TOKENS)), SamplingParams(
        max_tokens=1, extra_args={"kv_transfer_params": kv_transfer_params}), None)
    if finished:
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
    return request


def _allocated(ids: list[int]):
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    return KVCacheBlocks(([KVCacheBlock(i) for i in ids],))


def _instances(pair: int, taken: set[int]) -> tuple[Instance, Instance]:
    """The two drop-in instances of a pair (CURVE with per-instance keys, as vLLM runs them)."""
    (prefill_tp, decode_tp), _, mode = PAIRS[pair]
    prod, cons = (f"{name}-{pair}-{uuid.uuid4().hex[:8]}" for name in ("prod", "cons"))
    producer = Instance("kv_producer", prod, boot_epoch_of(prod), prefill_tp,
                        {"side_channel_host": "127.0.0.1", "side_channel_port": free_ports(prefill_tp, taken)})
    consumer = Instance("kv_consumer", cons, boot_epoch_of(cons), decode_tp,
                        {"side_channel_host": "127.0.0.1", "mode": mode})
    return producer, consumer


class Ranks:
    """Two processes: every producer worker of every pair, and every consumer worker."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        taken: set[int] = set()
        self.instances = [_instances(i, taken) for i in range(len(PAIRS))]
        members: dict[str, list[Member]] = {"prefill": [], "decode": []}
        for i, (_, case, _) in enumerate(PAIRS):
            for role, inst, side in zip(members, self.instances[i], (case.prefill, case.decode), strict=True):
                members[role] += [Member(i, inst, rank, case, vllm_recipe(side, inst.tp_size, rank))
                                  for rank in range(inst.tp_size)]
        self.procs, self.conns = [], {}
        for role, its in members.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=rank_main, args=(child, its), name=role)
            proc.start()
            self.procs.append(proc)
            self.conns[role] = parent
        self.blocks = {role: self._recv(conn, 180) for role, conn in self.conns.items()}

    @staticmethod
    def _recv(conn, timeout_s: float):
        return conn.recv() if conn.poll(timeout_s) else pytest.fail(f"a rank did not answer in {timeout_s} s")

    def submit(self, pair: int, role: str, sends: list, loads: list) -> None:
        self.conns[role].send(("submit", pair, (sends, loads)))
        assert self._recv(self.conns[role], 30) == "submitted"

    def wait(self, pair: int, role: str, req_ids: set[str]) -> list:
        """Per rank of the pair's instance of `role`: (what ended there, what its check found)."""
        self.conns[role].send(("wait", pair, req_ids))
        return self._recv(self.conns[role], 90)

    def close(self) -> None:
        for conn in self.conns.values():
            conn.send("stop")
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        assert all(p.exitcode == 0 for p in self.procs), [p.exitcode for p in self.procs]


@pytest.fixture(scope="module")
def ranks():
    started = Ranks()
    yield started
    started.close()


@pytest.mark.parametrize("pair", range(len(PAIRS)),
                         ids=[f"P{t[0]}-D{t[1]}-{c.name}-{m}" for t, c, m in PAIRS])
def test_vllm_block_ids_move_the_kernel_blocks_they_hold(ranks, pair):
    (prefill_tp, decode_tp), case, _ = PAIRS[pair]
    producer, consumer = ranks.instances[pair]
    prefill = SchedulerSide(producer.config(), block_size=case.prefill.block_size, tp_size=prefill_tp,
                            boot_epoch=producer.boot_epoch)
    prefill.learned_blocks({r: ranks.blocks["prefill"][(pair, r)] for r in range(prefill_tp)})
    kept, reply = prefill.finished(_request("req-p", {"do_remote_decode": True}, finished=True),
                                   manager_ids(0, "prefill", case.prefill))
    assert kept and reply["do_remote_prefill"] is True
    ranks.submit(pair, "prefill", prefill.take_jobs().sends, [])

    decode = SchedulerSide(consumer.config(), block_size=case.decode.block_size, tp_size=decode_tp,
                           boot_epoch=consumer.boot_epoch)
    request = _request("req-d", reply)
    assert decode.num_new_matched_tokens(request, 0) == (NUM_TOKENS, True)
    ours = manager_ids(0, "decode", case.decode)
    decode.after_alloc(request, _allocated(ours), NUM_TOKENS)
    loads = decode.take_jobs().loads
    assert [job.local_ids for job in loads] == [tuple(ours)]  # vLLM's ids, untranslated
    ranks.submit(pair, "decode", [], loads)
    finished = ranks.wait(pair, "decode", {"req-d"})
    assert len(finished) == decode_tp
    for rank, (ended, detail) in enumerate(finished):
        assert ended.recving == {"req-d"} and not ended.failed, (rank, ended)
        assert detail == "", f"decode rank {rank}: {detail}"
    assert all(ended.sending == {"req-p"} for ended, _ in ranks.wait(pair, "prefill", {"req-p"}))
    decode.loads_finished({"req-d"})

    # The same parameters again: refused (used once), reported with the blocks vLLM gave
    ranks.submit(pair, "decode", [], [dataclasses.replace(loads[0], req_id="req-replay")])
    for ended, _ in ranks.wait(pair, "decode", {"req-d", "req-replay"}):
        assert ended.failed == {"req-replay"} and ended.failed_blocks == set(ours), ended
