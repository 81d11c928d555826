"""Producer and consumer vLLM instances with KvxferConnector, driven like vLLM's two-step P/D
proxy. Greedy decoding must give exactly the plain instance's tokens, and must not when the
producer's weights differ (so the consumer really decodes from transferred KV)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from conftest import connector_config
from vllm_cases import MAX_TOKENS, PROMPTS

from kvxfer.integrations.vllm.testing import (
    ServerError,
    ServerSpec,
    VllmServer,
    free_port,
    prefill_then_decode,
    token_ids,
)


@contextlib.contextmanager
def producer(model: Path, name: str, logs: Path, curve: dict[str, object]) -> Iterator[VllmServer]:
    config = connector_config("kv_producer", curve, side_channel_port=free_port())
    server = VllmServer(ServerSpec(model=model, name=name, kv_transfer_config=config), logs)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_pd_tokens_equal_plain_then_producer_killed(models, logs, curve, consumer, plain_tokens):
    with producer(models["a"], "producer-a", logs, curve) as prod:
        for prompt in PROMPTS:
            first, second = prefill_then_decode(prod, consumer, prompt, max_tokens=MAX_TOKENS)
            params = first["kv_transfer_params"]
            assert params["do_remote_prefill"] is True and params["tp_size"] == 1, params
            assert token_ids(second) == plain_tokens[prompt], prompt

        # The producer dies after prefill, before the consumer loads: the consumer's request
        # fails (kv_load_failure_policy=fail) and the consumer keeps serving.
        prompt = "A lease holds blocks until every consumer confirms."
        first = prod.complete(prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        prod.kill()
    try:
        failed = consumer.complete(prompt, max_tokens=MAX_TOKENS,
                                   kv_transfer_params=first["kv_transfer_params"])
    except ServerError as err:
        assert err.status >= 500, err
    else:
        assert failed["choices"][0]["finish_reason"] == "error", failed
    again = consumer.complete(PROMPTS[0], max_tokens=MAX_TOKENS)
    assert token_ids(again) == plain_tokens[PROMPTS[0]]


def test_negative_control_other_weights_change_tokens(models, logs, curve, consumer, plain_tokens):
    with producer(models["b"], "producer-b", logs, curve) as prod:
        got = {p: token_ids(prefill_then_decode(prod, consumer, p, max_tokens=MAX_TOKENS)[1])
               for p in PROMPTS}
    same = [p[:40] for p in PROMPTS if got[p] == plain_tokens[p]]
    assert not same, f"tokens unchanged by another producer's KV for {same}: {got}"

