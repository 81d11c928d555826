"""Producer and consumer vLLM instances with KvxferConnector in its drop-in configuration (TP 1
each, READ, no kv_connector_extra_config: still CURVE, keys made per instance), driven like vLLM's
two-step P/D proxy. Greedy decoding must give exactly the plain instance's tokens, and must
not when the producer's weights differ (so the consumer really decodes from transferred KV)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import consumer_spec, producer_spec, servers
from vllm_cases import MAX_TOKENS, ORPHAN_PROMPT, PROMPTS

from kvxfer.integrations.vllm.testing import ServerError, VllmServer, prefill_then_decode, token_ids
from kvxfer.ports import free_port


@dataclass(frozen=True)
class Instances:
    consumer: VllmServer  # a failed load fails the request
    producer_a: VllmServer  # the consumer's weights
    producer_b: VllmServer  # other weights: the negative control


@pytest.fixture(scope="module")
def pd(models: dict[str, Path], logs: Path) -> Iterator[Instances]:
    """This module's instances, started at once."""
    with servers(consumer_spec(models["a"], "consumer", None), producer_spec(models["a"], "producer-a", None),
                 # its own side-channel port: the drop-in default is taken by producer-a
                 producer_spec(models["b"], "producer-b", None, side_channel_port=free_port()), logs=logs) as running:
        yield Instances(*running)


def test_pd_tokens_equal_plain_then_producer_killed(pd, plain_tokens):
    consumer, prod = pd.consumer, pd.producer_a
    for prompt in PROMPTS:
        first, second = prefill_then_decode(prod, consumer, prompt, max_tokens=MAX_TOKENS)
        params = first["kv_transfer_params"]
        assert params["do_remote_prefill"] is True and params["tp_size"] == 1, params
        assert params["producer_key"] and params["mac"], params  # drop-in: CURVE all the same
        assert token_ids(second) == plain_tokens[prompt], prompt

    # The producer dies after prefill, before the consumer loads: the consumer's request
    # fails (kv_load_failure_policy=fail) and the consumer keeps serving.
    prompt = ORPHAN_PROMPT
    first = prod.complete(prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    prod.kill()
    with pytest.raises(ServerError) as failed:
        consumer.complete(prompt, max_tokens=MAX_TOKENS, kv_transfer_params=first["kv_transfer_params"])
    assert failed.value.status == 500, failed.value
    again = consumer.complete(PROMPTS[0], max_tokens=MAX_TOKENS)
    assert token_ids(again) == plain_tokens[PROMPTS[0]]


def test_negative_control_other_weights_change_tokens(pd, plain_tokens):
    got = {p: token_ids(prefill_then_decode(pd.producer_b, pd.consumer, p, max_tokens=MAX_TOKENS)[1])
           for p in PROMPTS}
    same = [p[:40] for p in PROMPTS if got[p] == plain_tokens[p]]
    assert not same, f"tokens unchanged by another producer's KV for {same}: {got}"
