"""Hostile HTTP input against real services: forged transfer parameters sent to a decode service,
odd request bodies sent to prefill, malformed JSON to both.

KVXFER_API_FUZZ_INPUTS (default 300) sets how many inputs in all: a fifth forged transfer
parameters (another request's blocks, out-of-range, empty or shifted block lists, wrong token
counts, engine ids, boot epochs, TP sizes, request ids, side-channel addresses, first tokens,
protocol versions), a fifth prefill request bodies, three fifths raw bodies (to both services; a
forged-parameter input costs a prefill and a decode request, a raw one a few milliseconds). The long run
(`make fuzz-api`): KVXFER_API_FUZZ_INPUTS=10000.

Every reply must be a correct answer or a typed error body (4xx/5xx); a 200 only for parameters
the producer granted; the services stay ready; the only transfers ever posted are those of
answered requests (decode's `kvxfer_transfers_total` counts them: nothing else was read); every
forged parameter the producer signed is refused by decode's MAC check before any transfer,
counted there (`kvxfer_failures_total{kind="auth"}`); no block is held once leases expire.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvxfer.daemons import api
from kvxfer.daemons.cluster import LocalCluster, ServiceSpec
from kvxfer.engine.config import CacheConfig, EngineConfig, preset
from kvxfer.engine.engine import Engine
from kvxfer.engine.tokenizer import byte_level_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(os.environ.get("KVXFER_API_FUZZ_TIMEOUT_S", "1800")))]

FUZZ_INPUTS = int(os.environ.get("KVXFER_API_FUZZ_INPUTS", "300"))
NUM_DECODE = FUZZ_INPUTS // 5
NUM_PREFILL = FUZZ_INPUTS // 5
NUM_RAW = FUZZ_INPUTS - NUM_DECODE - NUM_PREFILL
PROMPT = "forged parameters must never read a byte"
MAX_TOKENS = 4
NUM_BLOCKS = 512
LEASE_S = 8.0
PREFILL_TP, DECODE_TP = 2, 1  # decode TP 1: rank 0's /metrics sees every transfer decode posts
LEGS = 2  # tiny has 2 KV heads: decode rank 0 reads one head from each prefill rank
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@dataclass
class Tally:
    answered: int = 0  # decode 200s: each moved LEGS transfers
    refused: dict[str, int] = field(default_factory=dict)  # decode error types

    def refuse(self, kind: str) -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1


@dataclass
class Harness:
    cluster: LocalCluster
    client: httpx.Client
    key: str  # decode's public key: leases are bound to it
    reference: list[int]
    tally: Tally = field(default_factory=Tally)
    _spare: dict | None = None  # an unused genuine lease
    _spare_at: float = 0.0

    @property
    def prefill(self) -> str:
        return self.cluster.by_name("prefill0").url

    @property
    def decode(self) -> str:
        return self.cluster.by_name("decode0").url

    def lease(self) -> dict:
        """Genuine transfer parameters for PROMPT, bound to decode (a spare one when fresh)."""
        if self._spare is not None and time.monotonic() - self._spare_at < LEASE_S / 2:
            params, self._spare = self._spare, None
            return params
        self._spare = None
        for _ in range(50):  # bounded: the cache may be full of fuzzed prefills' leases for a while
            reply = self.client.post(f"{self.prefill}/v1/completions", json={
                "prompt": PROMPT, "max_tokens": MAX_TOKENS, "kvxfer_consumer": {"consumer_key": self.key}})
            if reply.status_code == 200:
                return reply.json()["kv_transfer_params"]
            assert reply.status_code == 503, reply.text
            time.sleep(0.5)
        raise AssertionError("prefill kept refusing genuine requests")

    def keep(self, params: dict) -> None:
        """An untouched lease goes back for the next example."""
        self._spare, self._spare_at = params, time.monotonic()


def typed_error(reply: httpx.Response) -> str:
    """The error type of a non-200 reply; fails the test unless it is a typed error body."""
    assert 400 <= reply.status_code < 600, reply.status_code
    body = msgspec.json.decode(reply.content, type=api.ErrorResponse)
    assert body.error.type and body.error.message, reply.text
    assert body.error.type != "internal", f"a bug answered as an internal error: {reply.text}"
    return body.error.type


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    fast = ("--lease-s", str(LEASE_S), "--transfer-deadline-s", "2")
    cluster = LocalCluster(tmp_path_factory.mktemp("api-fuzz"),
                           [ServiceSpec("prefill", PREFILL_TP, num_blocks=NUM_BLOCKS, extra=fast)],
                           [ServiceSpec("decode", DECODE_TP, num_blocks=NUM_BLOCKS, extra=fast)],
                           preset="tiny", log_level="WARNING")
    cluster.start(timeout_s=400)
    model = preset("tiny")
    engine = Engine(EngineConfig(model=model, cache=CacheConfig(num_blocks=16), seed=0))
    reference = engine.generate(byte_level_tokenizer(model.vocab_size).encode(PROMPT).ids, MAX_TOKENS).tokens
    try:
        with httpx.Client(timeout=60) as client:
            key = client.get(f"{cluster.by_name('decode0').url}/v1/kvxfer/identity").json()["public_key"]
            yield Harness(cluster, client, key, reference)
    finally:
        cluster.stop()


# ---- forged transfer parameters -> decode ------------------------------------------------------

HUGE = st.sampled_from([-1, -(2**31), 2**31, 2**63 - 1, 2**63, 2**64, 10**30])
BLOCK = st.integers(0, NUM_BLOCKS + 8) | st.integers(0, 2**31 - 1) | HUGE


@st.composite
def mutations(draw) -> dict:
    """One or two edits of genuine parameters; "victim" means another live request's value."""
    edits = st.sampled_from(["victim_blocks", "blocks", "shift", "empty", "truncate", "extend",
                             "reverse", "duplicate", "num_tokens", "num_tokens_prompt", "request_id",
                             "victim_request_id", "engine_id", "boot_epoch", "tp_size", "side_channel",
                             "first_token_id", "protocol_version", "max_tokens", "drop_field"])
    return {"edits": draw(st.lists(edits, max_size=2, unique=True)),
            "blocks": draw(st.lists(BLOCK, max_size=40)), "number": draw(HUGE | st.integers(0, 64)),
            "text": draw(st.text(max_size=40) | st.sampled_from(["", "tcp://", "tcp://[::1", "ipc://", "x:y"])),
            "field": draw(st.sampled_from(["engine_id", "block_ids", "request_id", "side_channel", "tp_size",
                                           "boot_epoch", "num_tokens"]))}


CLAIMED = ("engine_id", "boot_epoch", "request_id", "block_ids", "side_channel", "tp_size", "num_tokens")


def claimed(params: dict) -> tuple:
    """What the producer granted: a 200 is right only for exactly one grant's values."""
    return tuple(repr(params.get(k)) for k in CLAIMED)


def forge(params: dict, victim: dict, edit: str, m: dict, body: dict) -> None:
    """Apply one edit in place (after an earlier edit, the block list may be empty or gone)."""
    blocks = list(params.get("block_ids") or [0])
    match edit:
        case "victim_blocks":
            params["block_ids"] = victim["block_ids"]
        case "blocks":
            params["block_ids"] = m["blocks"]
        case "shift":
            params["block_ids"] = [b + 1 for b in blocks]
        case "empty":
            params["block_ids"] = []
        case "truncate":
            params["block_ids"] = blocks[:-1]
        case "extend":
            params["block_ids"] = blocks + m["blocks"][:3] + [blocks[-1] + 1]
        case "reverse":
            params["block_ids"] = blocks[::-1] + [blocks[0]]
        case "duplicate":
            params["block_ids"] = [blocks[0]] * len(blocks)
        case "num_tokens":
            params["num_tokens"] = m["number"]
        case "num_tokens_prompt":  # keep the prompt consistent so the forgery reaches the producer
            n = max(1, min(abs(m["number"]), 4096))
            params["num_tokens"], body["prompt"] = n, [7] * n
        case "request_id":
            params["request_id"] = m["text"] or "0" * 32
        case "victim_request_id":
            params["request_id"] = victim["request_id"]
        case "engine_id":
            params["engine_id"] = m["text"] or "prefill9"
        case "boot_epoch":
            params["boot_epoch"] = m["number"]
        case "tp_size":
            params["tp_size"] = m["number"]
        case "side_channel":  # rarely a well-formed address where nothing answers (a 5 s deadline)
            params["side_channel"] = "tcp://127.0.0.1:1" if m["number"] == 0 else m["text"]
        case "first_token_id":  # signed too: decode continues from the token prefill sampled
            params["first_token_id"] = m["number"]
        case "protocol_version":
            params["protocol_version"] = m["number"]
        case "max_tokens":
            body["max_tokens"] = m["number"]
        case "drop_field":
            params.pop(m["field"], None)


@settings(FUZZ, max_examples=max(1, NUM_DECODE))
@given(m=mutations())
def test_decode_refuses_forged_transfer_params(harness, m):
    params, victim = harness.lease(), harness.lease()
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "kv_transfer_params": dict(params)}
    for edit in m["edits"]:
        forge(body["kv_transfer_params"], victim, edit, m, body)
    genuine = claimed(body["kv_transfer_params"]) in (claimed(params), claimed(victim))
    reply = harness.client.post(f"{harness.decode}/v1/completions", json=body)
    if reply.status_code == 200:
        got = reply.json()["choices"][0]["token_ids"]
        assert genuine, f"decode answered forged parameters {m['edits']}: {reply.text[:300]}"
        if "first_token_id" in m["edits"]:
            assert got[0] == body["kv_transfer_params"]["first_token_id"]
        elif body["max_tokens"] <= MAX_TOKENS:
            assert got == harness.reference[:body["max_tokens"]], m["edits"]
        harness.tally.answered += 1
    else:
        harness.tally.refuse(typed_error(reply))
    harness.keep(victim)  # the victim's lease was only named, never claimed with its own id...
    if "victim_request_id" in m["edits"]:
        harness._spare = None  # ...unless the forgery used its request id (decode then aborts it)


@pytest.mark.parametrize("tp_size", [1, 4])
def test_forged_tp_size_is_refused_by_the_producer(harness, tp_size):
    """The TP size decides which prefill ranks and heads decode reads: decode's MAC check refuses
    parameters that name another one, before any read or handshake beyond prefill rank 0."""
    params = harness.lease()
    started = time.monotonic()
    reply = harness.client.post(f"{harness.decode}/v1/completions", json={
        "prompt": PROMPT, "max_tokens": MAX_TOKENS, "kv_transfer_params": {**params, "tp_size": tp_size}})
    assert typed_error(reply) == "kv_load_failed"
    assert "fail their MAC check" in reply.json()["error"]["message"]
    assert time.monotonic() - started < 4.0
    harness.tally.refuse("kv_load_failed")


# ---- prefill request bodies --------------------------------------------------------------------

PROMPTS = (st.text(max_size=300) | st.lists(st.integers(0, 300) | HUGE, max_size=300)
           | st.sampled_from(["", None, 0, {}, [], [[1]], "\x00" * 64]))
BINDINGS = st.none() | st.fixed_dictionaries({}, optional={
    "consumer_key": st.text(max_size=300), "consumer_engine_id": st.text(max_size=300) | st.integers()})


@settings(FUZZ, max_examples=max(1, NUM_PREFILL))
@given(prompt=PROMPTS, max_tokens=HUGE | st.integers(-2, 70000), temperature=st.floats(allow_nan=True) | HUGE,
       seed=st.none() | HUGE | st.integers(), stream=st.booleans() | st.integers(), binding=BINDINGS,
       extra=st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10), max_size=3))
def test_prefill_request_bodies(harness, prompt, max_tokens, temperature, seed, stream, binding, extra):
    body = {**extra, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
            "stream": stream, "kvxfer_consumer": binding}
    try:
        content = msgspec.json.encode(body)
    except (OverflowError, msgspec.EncodeError):
        content = repr(body).encode()  # not JSON: must be refused as such
    reply = harness.client.post(f"{harness.prefill}/v1/completions", content=content,
                                headers={"content-type": "application/json"})
    if reply.status_code == 200:
        params = reply.json()["kv_transfer_params"]
        assert params["block_ids"] and params["num_tokens"] >= 1
    else:
        typed_error(reply)


# ---- raw bodies --------------------------------------------------------------------------------

RAW = st.binary(max_size=2000) | st.text(max_size=500).map(str.encode) | st.sampled_from([
    b"", b"{", b"null", b"[]", b'{"prompt": "x", "kv_transfer_params": {}}', b'{"prompt": "x"}' * 1000,
    b'{"prompt": "x", "kv_transfer_params": {"block_ids": [1e400]}}', b"[" * 100_000, b'"\xff\xfe"'])


@settings(FUZZ, max_examples=max(1, NUM_RAW))
@given(raw=RAW, to_decode=st.booleans())
def test_malformed_bodies(harness, raw, to_decode):
    url = harness.decode if to_decode else harness.prefill
    reply = harness.client.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    if reply.status_code != 200:
        typed_error(reply)
    else:
        assert not to_decode, "decode answered a body without valid transfer parameters"


# ---- afterwards --------------------------------------------------------------------------------

def metric(client: httpx.Client, url: str, name: str) -> float:
    total = 0.0
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name):
            total += float(line.rpartition(" ")[2])
    return total


def test_after_fuzzing_ready_no_stray_transfers_no_leaks(harness):
    client, decode, prefill = harness.client, harness.decode, harness.prefill
    for url in (decode, prefill):
        assert client.get(f"{url}/ready").status_code == 200
    # besides the fuzzer's, decode answered the proxy's rehearsal (kvxfer.daemons.rehearsal)
    rehearsed = metric(client, harness.cluster.url, 'kvxfer_proxy_rehearsals_total{backend="kvxfer",outcome="ok"}')
    assert rehearsed >= 1  # once, or again after a health check that failed on the way
    answered = harness.tally.answered + rehearsed
    transfers = metric(client, decode, 'kvxfer_transfers_total{op="read"}')
    assert transfers == LEGS * answered, (transfers, harness.tally)
    assert metric(client, decode, 'kvxfer_requests_total{outcome="ok"}') == answered
    assert metric(client, decode, 'kvxfer_requests_total{outcome="error"}') == 0
    forged = metric(client, decode, 'kvxfer_failures_total{kind="auth"}')
    print(f"\nAPI fuzz: {FUZZ_INPUTS} inputs; decode answered {harness.tally.answered}, refused "
          f"{harness.tally.refused}; MAC refusals at decode: {forged:.0f}")
    if NUM_DECODE >= 50:
        assert forged > 0
    deadline = time.monotonic() + LEASE_S + 10
    while time.monotonic() < deadline and (metric(client, prefill, "kvxfer_blocks_in_use ")
                                           or metric(client, decode, "kvxfer_blocks_in_use ")):
        time.sleep(0.5)
    for url in (decode, prefill):
        assert metric(client, url, "kvxfer_blocks_in_use ") == 0
        assert metric(client, url, "kvxfer_blocks_held ") == 0


def test_no_kernel_compiled_after_ready(harness):
    """Every rank answered the service's count of its kernel compiles (prefill runs TP 2, so rank
    1 answered over the bus) and none compiled after ready (on CPU nothing compiles at all)."""
    client = harness.client
    for url in (harness.decode, harness.prefill):
        text = client.get(f"{url}/metrics").text
        assert 'kvxfer_kernel_compiles{when="before_ready"}' in text, f"{url}: the ranks' counts never arrived"
        assert metric(client, url, 'kvxfer_kernel_compiles{when="after_ready"}') == 0
