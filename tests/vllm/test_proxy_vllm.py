"""`kvxfer proxy --backend vllm` in front of a real vLLM producer and consumer with
KvxferConnector, driven by the official `openai` client and by vLLM's own benchmark client.
Greedy answers through the proxy (completions and chat, whole and streamed) must equal one plain
vLLM's, token for token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from proxy_stack import (
    SERVED_MODEL,
    ProxyProcess,
    bench,
    build_chat_model,
    pd_behind_proxy,
    running,
)
from vllm_cases import PROMPTS

from kvxfer.integrations.vllm.testing import ServerSpec

MAX_TOKENS = 12
MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Which cache moves between prefill and decode?"}]
# The first test pays for three vLLM starts (plain, then producer and consumer), each 1-6 min on
# 2 busy cores: more than pytest.ini's 600 s per test.
pytestmark = pytest.mark.timeout(1800)
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


def ask(client: openai.OpenAI) -> dict[str, object]:
    """Every answer the tests compare: completions per prompt, one chat, as token ids and text."""
    answers: dict[str, object] = {}
    for prompt in PROMPTS:
        choice = client.completions.create(model=SERVED_MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                           **GREEDY).choices[0]
        answers[prompt] = (choice.token_ids, choice.text)
    chat = client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                          **GREEDY).choices[0]
    answers["chat"] = (chat.token_ids, chat.message.content)
    return answers


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("chat-model") / "tiny")


@pytest.fixture(scope="module")
def plain_answers(chat_model: Path, logs: Path) -> dict[str, object]:
    with running(ServerSpec(model=chat_model, name="plain-chat"), logs) as plain:
        return ask(openai.OpenAI(base_url=f"{plain.url}/v1", api_key="none", max_retries=0, timeout=120))


@pytest.fixture(scope="module")
def proxy(chat_model: Path, logs: Path, plain_answers) -> Iterator[ProxyProcess]:
    # plain_answers first: one vLLM pair alive at a time on this machine
    with pd_behind_proxy(chat_model, logs) as running_proxy:
        yield running_proxy


@pytest.fixture(scope="module")
def client(proxy: ProxyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="none", max_retries=0, timeout=180)


def test_the_proxy_rehearsed_the_pair_before_it_turned_ready(proxy):
    """Its /ready came after one request of its own through the vLLM pair answered
    (kvxfer.daemons.rehearsal), so the first client request is not the connector's first."""
    metrics = httpx.get(f"{proxy.url}/metrics").text.splitlines()
    ok = [float(x.split()[-1]) for x in metrics if x.startswith('kvxfer_proxy_rehearsals_total{backend="vllm",outcome="ok"}')]
    assert ok and ok[0] >= 1, [x for x in metrics if "rehearsal" in x]
    assert any("rehearsed prefill" in x for x in proxy.log_path.read_text().splitlines())


def test_answers_through_the_proxy_equal_plain_vllm(client, plain_answers):
    assert [m.id for m in client.models.list()] == [SERVED_MODEL]
    got = ask(client)
    for key, (tokens, text) in plain_answers.items():
        assert len(tokens) == MAX_TOKENS, key
        assert got[key] == (tokens, text), key


def test_streams_through_the_proxy_equal_plain_vllm(client, plain_answers):
    prompt = PROMPTS[1]
    chunks = list(client.completions.create(model=SERVED_MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                            stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain_answers[prompt][1]
    chunks = list(client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                 stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain_answers["chat"][1]
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_bad_requests_are_4xx_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as refused:  # the proxy's own check
        client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "robot", "content": "x"}])
    assert refused.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as refused:  # vLLM's, relayed as it is
        client.completions.create(model=SERVED_MODEL, prompt="word " * 2000, max_tokens=4)
    assert "context" in refused.value.message.lower() or "length" in refused.value.message.lower()


def test_vllm_bench_serve_through_the_proxy(proxy, chat_model, tmp_path):
    """A short load run with vLLM's benchmark client: every request completes, and the proxy's
    metrics saw each stream's first token and the gaps between tokens."""
    result = bench(proxy.url, chat_model, tmp_path, label="proxy-short", num_prompts=8, input_len=64,
                   output_len=8, concurrency=2)
    assert (result["completed"], result["failed"]) == (8, 0), result.get("errors")
    assert result["total_output_tokens"] == 8 * 8
    metrics = httpx.get(f"{proxy.url}/metrics").text
    line = next(x for x in metrics.splitlines()
                if x.startswith("kvxfer_proxy_time_to_first_token_seconds_count") and 'backend="vllm"' in x)
    assert float(line.split()[-1]) >= 8, line
    assert result["p50_ttft_ms"] > 0 and result["p50_itl_ms"] > 0
