"""Heterogeneous TP and WRITE, in the strict configuration (pre-shared CURVE keys): a TP 2 producer (one KV head per rank) pushes into a TP 1 consumer
in WRITE mode; a request whose prompt prefix the consumer already holds loads only the rest,
falling back to READ from both producer ranks. Both sides have staging slots, so the consumer
calibrates against the producer, as the daemons' decode service does; direct pushes only here
(the failed one below must be a push into the consumer's own blocks), so there is no estimate to
compare on a request's path. Tokens must equal the plain instance's. Then the
producer is killed after a prefill: this consumer's kv_load_failure_policy is `recompute`, so the
request still answers, with the plain tokens, computed locally."""

from __future__ import annotations

from conftest import consumer_spec, producer_spec, servers
from vllm_cases import MAX_TOKENS, ORPHAN_PROMPT, PREFIX_PROMPT, PROMPTS

from kvxfer.integrations.vllm.testing import prefill_then_decode, token_ids


def test_tp2_producer_writes_into_tp1_consumer(models, logs, curve, plain_tokens):
    spec = consumer_spec(models["a"], "consumer-write", curve, mode="write", transfer_path="direct", staging_mib=4,
                         policy="recompute")
    # lease_s: the test is not about leases, and on a loaded two-core machine vLLM itself took 31 s
    # to hand the consumer's first request to the connector (a CI run), past the default 30 s.
    producer = producer_spec(models["a"], "producer-tp2", curve, tp=2, staging_mib=4, lease_s=120)
    with servers(spec, producer, logs=logs) as (cons, prod):
        for prompt in [*PROMPTS, PREFIX_PROMPT]:
            first, second = prefill_then_decode(prod, cons, prompt, max_tokens=MAX_TOKENS)
            assert first["kv_transfer_params"]["tp_size"] == 2
            assert token_ids(second) == plain_tokens[prompt], prompt[:40]
        first = prod.complete(ORPHAN_PROMPT, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        prod.kill()
        recomputed = cons.complete(ORPHAN_PROMPT, max_tokens=MAX_TOKENS,
                                   kv_transfer_params=first["kv_transfer_params"])
        assert token_ids(recomputed) == plain_tokens[ORPHAN_PROMPT]
    log = (logs / "consumer-write.log").read_text()
    assert log.count("(write)") == len(PROMPTS) and log.count("(read)") == 1, "expected 3 writes, 1 read"
    assert log.count("kvxfer load failed") == 1  # so the plain tokens above were recomputed
    assert "calibrated against" in log, "the consumer did not calibrate against the producer"
    assert "direct write, by the only transfer the settings allow" in log
    # The failed load was a direct push: its blocks went back only after the push's deadline.
    assert log.count("a push the producer started in time may still land") == 1
