"""A consumer request that waits in vLLM's queue longer than the producer's lease still receives
its KV: the consumer's scheduler renews the lease from the moment vLLM has the request, queued or
not (kvxfer.agents.heartbeat). Without renewals the producer would free the blocks after LEASE_S
and this request, whose kv_load_failure_policy is `fail`, would end with an error."""

from __future__ import annotations

import threading
import time

import httpx
from conftest import connector_config, consumer_spec, servers
from vllm_cases import MAX_TOKENS, PROMPTS

from kvxfer.integrations.vllm.testing import ServerSpec, token_ids

# Renewals every LEASE_S / 6; the producer drops the lease after LEASE_S without one. On 2 cores
# CPU vLLM's decode threads can hold both for seconds, so the lease has room for a late renewal.
LEASE_S = 5.0
BLOCKER_TOKENS = 900  # the one running slot is busy this long (~20 s on 2 cores, well past LEASE_S)


def test_request_queued_past_the_lease_still_loads(models, logs, plain_tokens):
    cons = consumer_spec(models["a"], "consumer-queued", None)
    cons.extra_args += ["--max-num-seqs", "1"]  # one running request: the next one queues
    prod = ServerSpec(model=models["a"], name="producer-short-lease", kv_transfer_config=connector_config(
        "kv_producer", lease_s=LEASE_S, transfer_deadline_s=1))
    with servers(cons, prod, logs=logs) as (consumer, producer):
        prompt = PROMPTS[1]
        running = threading.Event()
        blocker = threading.Thread(target=_stream_long, args=(consumer.url, running), daemon=True)
        blocker.start()
        assert running.wait(120), "the blocking request never started streaming"
        # The lease starts now, with the consumer's one slot already busy.
        first = producer.complete(prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        started = time.monotonic()
        second = consumer.complete(prompt, max_tokens=MAX_TOKENS, kv_transfer_params=first["kv_transfer_params"],
                                   timeout_s=300)
        waited = time.monotonic() - started
        blocker.join(300)
        assert token_ids(second) == plain_tokens[prompt]
        assert waited > 1.5 * LEASE_S, f"the request waited {waited:.1f} s: not past the lease, proves nothing"
    producer_log = (logs / "producer-short-lease.log").read_text()
    assert "expired before every consumer rank confirmed" not in producer_log
    assert "kvxfer load failed" not in (logs / "consumer-queued.log").read_text()


def _stream_long(url: str, running: threading.Event) -> None:
    body = {"model": "tiny", "prompt": "A long answer", "max_tokens": BLOCKER_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as reply:
        for _ in reply.iter_lines():
            running.set()
