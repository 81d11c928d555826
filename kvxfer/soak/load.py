"""The load generator: `num_requests` requests through the proxy, `concurrency` at a time, each
bounded on the client side (`client_bound_s`: past it the request counts as hung).

Each request draws (from the load's seed) a prompt, a max_tokens, whether it streams and whether
its client hangs up mid-stream. Every reply is classified:

- ok: the tokens equal the single-process reference, token for token;
- wrong: any token differs (a prefix check for streams that ended early);
- failed/<kind>: a typed error body (HTTP 4xx/5xx) or an error event in the stream;
- unclear: anything else (non-JSON error, a stream cut without an error, a broken connection);
- aborted: the client hung up on purpose (its tokens so far are still checked);
- hung: no outcome within the bound.

A client that gets 5xx backs off (0.25 s doubling to 8 s) and waits for the proxy's /ready (a
circuit breaker, as a well-behaved client has), so a service restart is not a burst of refusals.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

from kvxfer.soak.config import SoakConfig
from kvxfer.soak.prompts import Prompt

OK, WRONG, FAILED, UNCLEAR, ABORTED, HUNG = "ok", "wrong", "failed", "unclear", "aborted", "hung"
MAX_BACKOFF_S = 8.0


@dataclass(frozen=True)
class Plan:
    index: int
    prompt: int  # index into the prompt list
    max_tokens: int
    stream: bool
    abort_after: int  # hang up after this many token events (0: never)


@dataclass(frozen=True)
class Outcome:
    index: int
    outcome: str  # OK, WRONG, FAILED, UNCLEAR, ABORTED, HUNG
    kind: str = ""  # error type for FAILED, what happened for UNCLEAR
    status: int = 0
    seconds: float = 0.0
    num_tokens: int = 0


def plan_requests(config: SoakConfig, num_prompts: int) -> list[Plan]:
    rng = random.Random(config.seed)
    plans = []
    for i in range(config.num_requests):
        max_tokens = rng.randint(config.min_tokens, config.max_tokens)
        stream = rng.random() < config.stream_fraction
        abort = stream and max_tokens > 1 and rng.random() < config.abort_fraction
        plans.append(Plan(i, rng.randrange(num_prompts), max_tokens, stream,
                          rng.randint(1, max_tokens - 1) if abort else 0))
    return plans


class LoadGenerator:
    def __init__(self, config: SoakConfig, url: str, prompts: list[Prompt]) -> None:
        self.config = config
        self.url = url
        self.prompts = prompts
        self.plans = plan_requests(config, len(prompts))
        self.outcomes: list[Outcome] = []
        self.sent = 0  # read by the fault injector's thread (an int: atomic enough)
        self._next = 0

    async def run(self) -> list[Outcome]:
        deadline = time.monotonic() + self.config.max_time_s
        limits = httpx.Limits(max_connections=self.config.concurrency * 2)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.config.client_bound_s, connect=10.0),
                                     limits=limits) as client:
            await asyncio.gather(*(self._worker(client, deadline) for _ in range(self.config.concurrency)))
        return sorted(self.outcomes, key=lambda o: o.index)

    async def _worker(self, client: httpx.AsyncClient, deadline: float) -> None:
        failures = 0
        while self._next < len(self.plans) and time.monotonic() < deadline:
            plan = self.plans[self._next]
            self._next += 1
            self.sent += 1
            outcome = await self._bounded(client, plan)
            self.outcomes.append(outcome)
            failures = failures + 1 if outcome.status >= 500 else 0
            if failures:
                await self._back_off(client, failures)

    async def _back_off(self, client: httpx.AsyncClient, failures: int) -> None:
        """Sleep (0.25 s doubling to 8 s), then wait (bounded) for the proxy's /ready: a client
        with a circuit breaker, so a service restart costs a few refusals, not a burst of them."""
        await asyncio.sleep(min(MAX_BACKOFF_S, 0.25 * 2 ** (failures - 1)))
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"{self.url}/ready", timeout=5.0)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)

    async def _bounded(self, client: httpx.AsyncClient, plan: Plan) -> Outcome:
        started = time.monotonic()
        try:
            outcome = await asyncio.wait_for(self._one(client, plan), self.config.client_bound_s)
        except asyncio.TimeoutError:
            return Outcome(plan.index, HUNG, f"no outcome within {self.config.client_bound_s:.0f} s",
                           seconds=time.monotonic() - started)
        except httpx.HTTPError as err:
            return Outcome(plan.index, UNCLEAR, f"{type(err).__name__}", seconds=time.monotonic() - started)
        except (ValueError, KeyError, IndexError, TypeError) as err:  # an event that is not ours
            return Outcome(plan.index, UNCLEAR, f"malformed event ({type(err).__name__})",
                           seconds=time.monotonic() - started)
        return Outcome(plan.index, outcome.outcome, outcome.kind, outcome.status,
                       time.monotonic() - started, outcome.num_tokens)

    async def _one(self, client: httpx.AsyncClient, plan: Plan) -> Outcome:
        body = {"prompt": self.prompts[plan.prompt].text, "max_tokens": plan.max_tokens, "stream": plan.stream}
        want = list(self.prompts[plan.prompt].reference[:plan.max_tokens])
        if not plan.stream:
            reply = await client.post(f"{self.url}/v1/completions", json=body)
            return _classify_json(plan, reply, want)
        async with client.stream("POST", f"{self.url}/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                return _classify_json(plan, httpx.Response(reply.status_code, content=await reply.aread()), want)
            return await _classify_stream(plan, reply, want)


def _error_kind(reply: httpx.Response) -> str | None:
    try:
        return str(reply.json()["error"]["type"]) or None
    except (ValueError, KeyError, TypeError):
        return None


def _classify_json(plan: Plan, reply: httpx.Response, want: list[int]) -> Outcome:
    if reply.status_code != 200:
        kind = _error_kind(reply)
        if kind is None:
            return Outcome(plan.index, UNCLEAR, f"HTTP {reply.status_code} without a typed error", reply.status_code)
        return Outcome(plan.index, FAILED, kind, reply.status_code)
    try:
        got = list(reply.json()["choices"][0]["token_ids"])
    except (ValueError, KeyError, IndexError, TypeError):
        return Outcome(plan.index, UNCLEAR, "HTTP 200 without token ids", 200)
    return Outcome(plan.index, OK if got == want else WRONG, "", 200, num_tokens=len(got))


async def _classify_stream(plan: Plan, reply: httpx.Response, want: list[int]) -> Outcome:
    got: list[int] = []
    async for line in reply.aiter_lines():  # bounded by max_tokens events and the client bound
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return Outcome(plan.index, OK if got == want else WRONG, "", 200, num_tokens=len(got))
        event = json.loads(data)
        if "error" in event:
            kind = "wrong" if got != want[:len(got)] else str(event["error"].get("type", "")) or "untyped"
            return Outcome(plan.index, WRONG if kind == "wrong" else FAILED, kind, 200, num_tokens=len(got))
        got.extend(event["choices"][0]["token_ids"])
        if plan.abort_after and len(got) >= plan.abort_after:
            return Outcome(plan.index, ABORTED if got == want[:len(got)] else WRONG, "", 200, num_tokens=len(got))
    return Outcome(plan.index, UNCLEAR, "stream ended without [DONE] or an error event", 200, num_tokens=len(got))
