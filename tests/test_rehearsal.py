"""The proxy's rehearsal bookkeeping (kvxfer.daemons.rehearsal): which pairs are rehearsed, when
again, and what `/ready` waits for. The requests themselves are real in
tests/test_openai_client.py (every pair rehearsed before the proxy's /ready) and in every
`kvxfer demo`; here `run` stands for them, so that a failure and a restart mid-rehearsal can be
had on cue."""

from __future__ import annotations

import asyncio

from kvxfer.daemons.backends import ProxyError
from kvxfer.daemons.rehearsal import Rehearsals

P, Q, D = "http://p:1", "http://q:1", "http://d:1"


def test_each_pair_of_ready_servers_is_rehearsed_once_and_ready_waits_for_it():
    async def main():
        ran, outcomes = [], []
        release = asyncio.Event()

        async def run(pair):
            ran.append(pair)
            await release.wait()

        r = Rehearsals(run, enabled=True, timeout_s=5.0)
        pairs = r.due([P, Q], [D])
        assert pairs == [(P, D), (Q, D)] and r.due([P, Q], [D]) == []  # running: not again
        tasks = [asyncio.create_task(r.rehearse(pair, outcomes.append)) for pair in pairs]
        await asyncio.sleep(0)
        assert r.pending([P, Q], [D]) == 2 and r.pending([P], [D]) == 1
        release.set()
        await asyncio.gather(*tasks)
        assert ran == pairs and outcomes == ["ok", "ok"]
        assert r.pending([P, Q], [D]) == 0 and r.due([P, Q], [D]) == []

    asyncio.run(main())


def test_a_failed_rehearsal_stops_holding_ready_and_is_not_retried_until_a_server_turns_ready_again():
    async def main():
        outcomes = []

        async def run(pair):
            raise ProxyError("kv_load_failed", "decode could not load", 502)

        r = Rehearsals(run, enabled=True, timeout_s=5.0)
        [pair] = r.due([P], [D])
        await r.rehearse(pair, outcomes.append)
        assert outcomes == ["kv_load_failed"] and r.pending([P], [D]) == 0 and r.due([P], [D]) == []
        r.turned_ready(D)  # a restart: its pairs are rehearsed anew
        assert r.pending([P], [D]) == 1 and r.due([P], [D]) == [(P, D)]

    asyncio.run(main())


def test_a_rehearsal_past_its_timeout_fails_as_a_timeout():
    async def main():
        outcomes = []

        async def run(pair):
            await asyncio.Event().wait()  # never answered

        r = Rehearsals(run, enabled=True, timeout_s=0.05)
        [pair] = r.due([P], [D])
        await r.rehearse(pair, outcomes.append)
        assert outcomes == ["timeout"] and r.pending([P], [D]) == 0

    asyncio.run(main())


def test_a_server_that_restarts_mid_rehearsal_is_rehearsed_again():
    async def main():
        outcomes = []
        release = asyncio.Event()

        async def run(pair):
            await release.wait()

        r = Rehearsals(run, enabled=True, timeout_s=5.0)
        [pair] = r.due([P], [D])
        task = asyncio.create_task(r.rehearse(pair, outcomes.append))
        await asyncio.sleep(0)
        r.turned_ready(P)  # the answer on its way is the old process's
        release.set()
        await task
        assert r.pending([P], [D]) == 1 and r.due([P], [D]) == [(P, D)]

    asyncio.run(main())


def test_disabled_rehearses_nothing_and_holds_nothing():
    async def run(pair):
        raise AssertionError("rehearsed while disabled")

    r = Rehearsals(run, enabled=False, timeout_s=5.0)
    assert r.due([P], [D]) == [] and r.pending([P], [D]) == 0
