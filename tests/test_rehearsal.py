"""The proxy's rehearsal bookkeeping (kvxfer.daemons.rehearsal): which pairs are rehearsed, when
again, and what `/ready` waits for. The requests themselves are real in
tests/test_openai_client.py and tests/vllm/test_proxy_vllm.py (every pair rehearsed before the
proxy's /ready) and in every `kvxfer demo`; here `run` stands for them, so that a failure, a
timeout and a restart mid-rehearsal come on cue."""

from __future__ import annotations

import asyncio

import httpx

from kvxfer.daemons.backends import ProxyError
from kvxfer.daemons.rehearsal import Rehearsals

P, Q, D = "http://p:1", "http://q:1", "http://d:1"


def rehearse_all(r: Rehearsals, prefill, decode, outcomes) -> list[asyncio.Task]:
    return [asyncio.create_task(r.rehearse(pair, rehearsal, outcomes.append))
            for pair, rehearsal in r.due(prefill, decode)]


def held_until(release: asyncio.Event, ran: list):
    """A rehearsal's request that is answered once `release` is set; `ran` lists its pairs."""
    async def run(pair):
        ran.append(pair)
        await release.wait()

    return run


def test_each_pair_of_ready_servers_is_rehearsed_once_and_ready_waits_for_it():
    async def main():
        ran, outcomes = [], []
        release = asyncio.Event()
        r = Rehearsals(held_until(release, ran), enabled=True, timeout_s=5.0)
        assert r.pending([P, Q], [D]) == 2  # ready, not rehearsed yet
        tasks = rehearse_all(r, [P, Q], [D], outcomes)
        assert len(tasks) == 2 and r.due([P, Q], [D]) == []  # running: not again
        await asyncio.sleep(0)
        assert r.pending([P, Q], [D]) == 2 and r.pending([P], [D]) == 1
        release.set()
        await asyncio.gather(*tasks)
        assert ran == [(P, D), (Q, D)] and outcomes == ["ok", "ok"]
        assert r.pending([P, Q], [D]) == 0 and r.due([P, Q], [D]) == []

    asyncio.run(main())


def test_a_failed_rehearsal_stops_holding_ready_and_is_not_retried_until_a_server_turns_ready_again():
    async def main():
        outcomes = []
        failures = iter([ProxyError("kv_load_failed", "decode could not load", 502), httpx.ConnectError("refused"),
                         ValueError("no model listed")])

        async def run(pair):
            raise next(failures)

        r = Rehearsals(run, enabled=True, timeout_s=5.0)
        await asyncio.gather(*rehearse_all(r, [P], [D], outcomes))
        assert outcomes == ["kv_load_failed"] and r.pending([P], [D]) == 0 and r.due([P], [D]) == []
        for _ in range(2):
            r.turned_ready(D)  # a restart: rehearsed anew, without holding /ready again
            assert r.pending([P], [D]) == 0
            await asyncio.gather(*rehearse_all(r, [P], [D], outcomes))
        assert outcomes == ["kv_load_failed", "unavailable", "bad_answer"]  # a fixed few kinds

    asyncio.run(main())


def test_a_rehearsal_past_its_timeout_fails_as_a_timeout():
    async def main():
        outcomes = []

        async def run(pair):
            await asyncio.Event().wait()  # never answered

        r = Rehearsals(run, enabled=True, timeout_s=0.05)
        await asyncio.gather(*rehearse_all(r, [P], [D], outcomes))
        assert outcomes == ["timeout"] and r.pending([P], [D]) == 0

    asyncio.run(main())


def test_a_server_that_restarts_mid_rehearsal_is_rehearsed_again_once_the_old_one_ended():
    """The answer on its way is the old process's: not counted, and the pair is rehearsed anew,
    but never twice at once."""
    async def main():
        outcomes, ran = [], []
        release = asyncio.Event()
        r = Rehearsals(held_until(release, ran), enabled=True, timeout_s=5.0)
        [old] = rehearse_all(r, [P], [D], outcomes)
        await asyncio.sleep(0)
        r.turned_ready(P)
        assert r.due([P], [D]) == []  # the old one still runs
        release.set()
        await old
        assert outcomes == [] and ran == [(P, D)]
        await asyncio.gather(*rehearse_all(r, [P], [D], outcomes))
        assert outcomes == ["ok"] and ran == [(P, D), (P, D)]

    asyncio.run(main())


def test_disabled_rehearses_nothing_and_holds_nothing():
    async def run(pair):
        raise AssertionError("rehearsed while disabled")

    r = Rehearsals(run, enabled=False, timeout_s=5.0)
    assert r.due([P], [D]) == [] and r.pending([P], [D]) == 0
