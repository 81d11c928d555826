"""A consumer request that waits in vLLM's queue longer than the producer's lease still receives
its KV: the consumer's scheduler renews the lease from the moment vLLM has the request, queued or
not (kvxfer.agents.heartbeat). Without renewals the producer would free the blocks after LEASE_S
and this request, whose kv_load_failure_policy is `fail`, would end with an error."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import connector_config, consumer_spec, servers
from vllm_cases import MAX_TOKENS, PROMPTS

from kvxfer.integrations.vllm.testing import ServerSpec, token_ids

# Renewals every LEASE_S / 6; the producer drops the lease after LEASE_S without one. The lease
# runs from the producer's hold, before the request reaches the consumer: on 2 cores under load
# that trip (the producer's reply, the consumer's API server, its engine's queue) took 3-5 s,
# so the lease leaves room for it (the first renewal comes as soon as the consumer has it).
LEASE_S = 8.0
# Two streamed blockers of 1,000 tokens (the model's context is 1,024), the second queued behind
# the first: together longer than the test needs the slot busy (one took ~40 s on 2 cores under
# load, under 10 s on the same machine idle); both are cancelled then.
BLOCKER_TOKENS = 1000


def test_request_queued_past_the_lease_still_loads(models, logs, plain_tokens):
    cons = consumer_spec(models["a"], "consumer-queued", None)
    cons.extra_args += ["--max-num-seqs", "1"]  # one running request: the next one queues
    prod = ServerSpec(model=models["a"], name="producer-short-lease", kv_transfer_config=connector_config(
        "kv_producer", lease_s=LEASE_S, transfer_deadline_s=1))
    with servers(cons, prod, logs=logs) as (consumer, producer), ThreadPoolExecutor(1) as pool:
        prompt = PROMPTS[1]
        running = Blocker(consumer.url)
        assert running.running.wait(120), "the blocking request never started streaming"
        queued = Blocker(consumer.url)  # queued behind it (sent first), ahead of the request under test
        first = producer.complete(prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        leased = time.monotonic()  # the producer held the lease before it answered
        second = pool.submit(consumer.complete, prompt, max_tokens=MAX_TOKENS,
                             kv_transfer_params=first["kv_transfer_params"], timeout_s=300)
        # The consumer's one slot stays busy until well past the lease, then frees: the queued
        # request runs only then.
        assert not queued.ended.wait(leased + LEASE_S + 2 - time.monotonic()), \
            "the blocking requests ended before the lease did: this run proves nothing"
        running.cancel()
        queued.cancel()
        assert token_ids(second.result(300)) == plain_tokens[prompt]
    producer_log = (logs / "producer-short-lease.log").read_text()
    assert "expired before every consumer rank confirmed" not in producer_log
    assert "kvxfer load failed" not in (logs / "consumer-queued.log").read_text()


class Blocker:
    """A long streamed completion that keeps the consumer's one running slot busy until cancelled
    (closing the stream aborts it in vLLM)."""

    def __init__(self, url: str) -> None:
        self.running, self.ended, self._cancel = threading.Event(), threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._stream, args=(url,), daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()
        self._thread.join(60)

    def _stream(self, url: str) -> None:
        body = {"model": "tiny", "prompt": "A long answer", "max_tokens": BLOCKER_TOKENS, "temperature": 0.0,
                "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as reply:
                for _ in reply.iter_lines():
                    self.running.set()
                    if self._cancel.is_set():
                        return
        finally:
            self.ended.set()
