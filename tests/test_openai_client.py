"""The official `openai` client against a real `kvxfer proxy` over real prefill and decode
services (separate processes, real NIXL, real HTTP), all three started with API keys: models,
completions and chat, whole and streamed, stop strings, keys refused (401), bodies refused (400
naming the field). Every answer is checked against a single-process run of the same model.
The same cluster shows readiness that includes the transfer path (docs/readiness.md): decode0 is
told its producer (`--producers`), decode1 one that never comes up.
"""

from __future__ import annotations

import secrets
import time

import httpx
import openai
import pytest

from kvxfer.daemons.chat_template import PLAIN_TEMPLATE, ChatTemplate
from kvxfer.daemons.cluster import LocalCluster, ServiceSpec
from kvxfer.engine.config import CacheConfig, EngineConfig, preset
from kvxfer.engine.engine import Engine
from kvxfer.engine.tokenizer import byte_level_tokenizer
from kvxfer.ports import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "tiny"
PROMPT = "The proxy is the front door: clients speak OpenAI to it."
MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What moves between prefill and decode?"}]
MAX_TOKENS = 12
TOKENIZER = byte_level_tokenizer(preset(MODEL).vocab_size)


def reference(prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    model = preset(MODEL)
    engine = Engine(EngineConfig(model=model, cache=CacheConfig(num_blocks=32), seed=0))
    return engine.generate(TOKENIZER.encode(prompt).ids, max_tokens).tokens


def chat_prompt() -> str:
    """What the services render for MESSAGES: a preset has no template, so the plain default."""
    return ChatTemplate(PLAIN_TEMPLATE, "test").render(MESSAGES)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, object]:
    """The proxy's clients' key, the services' key (the proxy presents it), and their files."""
    root = tmp_path_factory.mktemp("keys")
    found = {"client": secrets.token_hex(16), "service": secrets.token_hex(16)}
    for name in ("client", "service"):
        path = root / f"{name}.keys"
        path.write_text(f"# one key per line\n{found[name]}\n")
        found[f"{name}_file"] = path
    return found


@pytest.fixture(scope="module")
def nobody() -> str:
    """A side channel nobody listens on: decode1's producer that never comes up."""
    return f"tcp://127.0.0.1:{free_ports(1, set())}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, keys, nobody):
    # decode0 is told its producer up front; decode1 is told of one that never comes up (and
    # hears of prefill0 from the proxy).
    decode = [ServiceSpec("decode", num_blocks=64, meet_producers=True),
              ServiceSpec("decode", num_blocks=64, extra=("--producers", nobody, "--producers-wait-s", "3"))]
    cluster = LocalCluster(tmp_path_factory.mktemp("openai"), [ServiceSpec("prefill", num_blocks=64)],
                           decode, preset=MODEL, log_level="INFO",
                           extra=("--api-key-file", str(keys["service_file"])),
                           proxy_args=("--api-key-file", str(keys["client_file"]),
                                       "--backend-api-key-file", str(keys["service_file"])))
    try:
        cluster.start(timeout_s=300)
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def client(cluster, keys) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=keys["client"], max_retries=0, timeout=120)


def test_the_proxy_rehearsed_each_pair_before_it_turned_ready(cluster):
    """First in this module, before any client request: the proxy's /ready came once it had
    sent one request of its own through each (prefill, decode) pair (kvxfer.daemons.rehearsal),
    each answered by that decode service, so no client request is a pair's first."""
    proxy = cluster.proxy
    decodes = [cluster.by_name(f"decode{i}") for i in range(2)]
    rehearsed = metric(cluster.url, 'kvxfer_proxy_rehearsals_total{backend="kvxfer",outcome="ok"}')
    answered = [ok_count(d.url) for d in decodes]  # no client request yet: each is a rehearsal
    assert rehearsed >= 2 and all(n >= 1 for n in answered), (rehearsed, answered)
    lines = [x for x in proxy.log_path.read_text().splitlines() if "rehearsed prefill" in x]
    assert all(any(f"-> decode {d.url}:" in x for x in lines) for d in decodes), lines
    assert httpx.get(f"{cluster.url}/ready").json()["rehearsing"] == 0


def test_models_lists_the_served_model(client, cluster, keys):
    assert [m.id for m in client.models.list()] == [MODEL]
    decode = cluster.by_name("decode0").url
    direct = openai.OpenAI(base_url=f"{decode}/v1", api_key=keys["service"], max_retries=0)
    assert [m.id for m in direct.models.list()] == [MODEL]


def test_completion_equals_one_process(client):
    want = reference(PROMPT)
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    choice = answer.choices[0]
    assert choice.token_ids == want
    assert choice.text == TOKENIZER.decode(want) and choice.finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(TOKENIZER.encode(PROMPT).ids), MAX_TOKENS)


def test_completion_stream_carries_the_same_text_and_usage_last(client):
    want = reference(PROMPT)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True}))
    tokens = [c for c in chunks if c.choices]
    assert [t for c in tokens for t in c.choices[0].token_ids] == want
    assert "".join(c.choices[0].text for c in tokens) == TOKENIZER.decode(want)
    assert [c.choices[0].finish_reason for c in tokens][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_chat_uses_the_template_and_equals_one_process(client):
    want = reference(chat_prompt())
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
    message = answer.choices[0].message
    assert message.role == "assistant" and message.content == TOKENIZER.decode(want)
    assert answer.usage.prompt_tokens == len(TOKENIZER.encode(chat_prompt()).ids)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")


def test_chat_stream_equals_the_whole_answer(client):
    want = TOKENIZER.decode(reference(chat_prompt()))
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=MAX_TOKENS,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_answer(client, stream):
    full = TOKENIZER.decode(reference(PROMPT))
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stop=[stop, "never in the text"])
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, finish = choice.text, choice.finish_reason
    assert (text, finish) == (full[:full.find(stop)], "stop")


def test_wrong_and_missing_key_are_401(cluster, keys):
    for url in (cluster.url, cluster.by_name("prefill0").url, cluster.by_name("decode0").url):
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="not-" + keys["client"], max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        missing = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
        assert missing.status_code == 401, missing.text
        assert "Authorization: Bearer" in missing.json()["error"]["message"]
        for probe in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{url}{probe}").status_code == 200, (url, probe)
    # the services refuse the clients' key too: only the proxy holds theirs
    decode = openai.OpenAI(base_url=f"{cluster.by_name('decode0').url}/v1", api_key=keys["client"], max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        decode.models.list()


@pytest.mark.parametrize("call,param", [
    (lambda c: c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=-3), "max_tokens"),
    (lambda c: c.completions.create(model=MODEL, prompt=PROMPT, n=2), "n"),
    (lambda c: c.completions.create(model=MODEL, prompt=PROMPT, extra_body={"stop": [""]}), "stop[0]"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[]), "messages"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[{"content": "hi"}]), "messages[0].role"),
])
def test_malformed_body_is_400_naming_the_field(client, call, param):
    with pytest.raises(openai.BadRequestError) as refused:
        call(client)
    assert refused.value.status_code == 400 and refused.value.param == param, refused.value.body
    assert refused.value.type == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=2)
    assert refused.value.param == "model" and MODEL in refused.value.message


def test_proxy_metrics_time_streams(cluster, client):
    list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True))
    metrics = httpx.get(f"{cluster.url}/metrics").text
    for name in ("kvxfer_proxy_time_to_first_token_seconds_count", "kvxfer_proxy_inter_token_seconds_count"):
        line = next(x for x in metrics.splitlines() if x.startswith(name) and '"/v1/completions"' in x)
        assert float(line.split()[-1]) >= 1, line
    assert 'kvxfer_proxy_requests_total{backend="kvxfer",endpoint="auth",outcome="invalid_api_key"}' in metrics


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in {url}/metrics")


def test_decode_told_its_producer_meets_it_before_ready_and_requests_handshake_no_more(cluster, client):
    """decode0 (`--producers` prefill0) was ready only once it had met prefill0: a request
    through it handshakes with nobody; every handshake in its log precedes that meeting."""
    decode0 = cluster.by_name("decode0")
    assert metric(decode0.url, "kvxfer_producers_met") == 1
    assert metric(decode0.url, "kvxfer_producer_meetings_total") == 1
    before, want = ok_count(decode0.url), reference(PROMPT, 4)
    while ok_count(decode0.url) == before:  # round robin: within two requests one is decode0's
        assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).choices[0].token_ids == want
    lines = decode0.log_path.read_text().splitlines()
    met = next(i for i, x in enumerate(lines) if "met producer prefill0" in x)
    handshakes = [i for i, x in enumerate(lines) if "handshake with producer prefill0" in x]
    assert handshakes and max(handshakes) < met, lines[met]
    assert "handshake" in lines[met] and "prepare" in lines[met]


def test_a_producer_that_never_answers_holds_ready_only_for_the_wait(cluster, nobody, keys):
    """decode1's --producers names a side channel nobody listens on: /ready says so while it
    waits, then turns 200 without it (a warning names it); the proxy meanwhile tells decode1
    of prefill0, which it meets in the background."""
    decode1 = cluster.by_name("decode1")
    assert any("ready without producer " + nobody in x for x in decode1.log_path.read_text().splitlines())
    cluster.relaunch("decode1")
    reasons = [""]

    def waiting_for_nobody() -> bool:
        try:
            reply = httpx.get(f"{decode1.url}/ready", timeout=2.0)
        except httpx.TransportError:  # not listening yet
            return False
        assert reply.status_code == 503, f"ready before the wait ended; it said {reasons}"
        reasons.append(reply.json()["reason"])
        return "meeting producers" in reasons[-1]

    wait_for(waiting_for_nobody, "decode1 says it waits for its producers")
    assert nobody in reasons[-1], reasons[-1]
    cluster.wait_ready(timeout_s=60, services=[decode1])
    wait_for(lambda: metric(decode1.url, "kvxfer_producers_met") == 1, "the proxy introduced prefill0 to decode1")
    assert metric(decode1.url, "kvxfer_producers_unmet") == 1
    refused = httpx.post(f"{decode1.url}/v1/kvxfer/producers", json={"side_channel": "udp://x"},
                         headers={"authorization": f"Bearer {keys['service']}"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "side_channel"


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.05)


def ok_count(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return sum(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith('kvxfer_requests_total{outcome="ok"}'))


def test_balances_over_decode_services_and_routes_around_a_dead_one(cluster, client):
    """Last in this module: it kills a decode service. Requests alternate between the two;
    once one is dead every request still succeeds (the proxy skips it, its health check
    reports it), and the proxy counts the failed attempts by kind."""
    urls = [cluster.by_name(f"decode{i}").url for i in range(2)]
    before = [ok_count(u) for u in urls]
    want = reference(PROMPT, 4)
    for _ in range(4):
        assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).choices[0].token_ids == want
    assert all(ok_count(u) - b >= 1 for u, b in zip(urls, before, strict=True))
    cluster.kill("decode1")
    for _ in range(4):
        assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).choices[0].token_ids == want
    ready = httpx.get(f"{cluster.url}/ready").json()
    assert ready == {"ready": True, "prefill": 1, "decode": 1, "rehearsing": 0}
    metrics = httpx.get(f"{cluster.url}/metrics").text
    failed = [x for x in metrics.splitlines() if x.startswith("kvxfer_proxy_backend_errors_total{") and 'pool="decode"' in x]
    # a request that picked the dead one (decode_unavailable, then the other) or a health check (not_ready)
    assert failed and {x.split('kind="')[1].split('"')[0] for x in failed} <= {"decode_unavailable", "not_ready"}, failed
