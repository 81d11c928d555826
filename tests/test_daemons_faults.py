"""Faults through real services: a prefill killed between prefill and decode, a decode killed
mid-generation, a prefill restarted (new boot epoch). Each request ends with a clear error or a
correct answer, never a hang; later requests succeed; no block stays held once leases expire."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import pytest
from test_daemons_e2e import MAX_TOKENS, PROMPT, reference

from kvxfer.agents import messages as m
from kvxfer.daemons.cluster import LocalCluster, ServiceSpec
from kvxfer.daemons.decode_rank import REQUEST_TIMEOUT_S
from kvxfer.errors import AuthError
from kvxfer.soak.procs import rank_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
LEASE_S = 3.0
TRANSFER_DEADLINE_S = 2.0
FAST = ("--lease-s", str(LEASE_S), "--transfer-deadline-s", str(TRANSFER_DEADLINE_S))


@pytest.fixture(scope="module")
def want() -> list[int]:
    return reference(PROMPT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("faults"),
                     [ServiceSpec("prefill", 2, extra=FAST)], [ServiceSpec("decode", 2, extra=FAST)],
                     preset="tiny", log_level="WARNING", proxy_args=("--request-timeout-s", "60"))
    c.start(timeout_s=300)
    yield c
    c.stop()


def prefill_only(client: httpx.Client, cluster: LocalCluster) -> dict:
    decode = cluster.by_name("decode0")
    key = client.get(f"{decode.url}/v1/kvxfer/identity").json()["public_key"]
    reply = client.post(f"{cluster.by_name('prefill0').url}/v1/completions",
                        json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "kvxfer_consumer": {"consumer_key": key}})
    assert reply.status_code == 200, reply.text
    return reply.json()["kv_transfer_params"]


def decode_with(client: httpx.Client, cluster: LocalCluster, params: dict) -> httpx.Response:
    return client.post(f"{cluster.by_name('decode0').url}/v1/completions",
                       json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "kv_transfer_params": params})


def through_proxy(client: httpx.Client, cluster: LocalCluster) -> httpx.Response:
    return client.post(f"{cluster.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS})


def blocks_in_use(client: httpx.Client, url: str) -> float:
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith("kvxfer_blocks_in_use "):
            return float(line.split()[1])
    raise AssertionError("no kvxfer_blocks_in_use in /metrics")


def test_prefill_killed_between_prefill_and_decode(cluster, want):
    with httpx.Client(timeout=60) as client:
        params = prefill_only(client, cluster)
        cluster.kill("prefill0")
        started = time.monotonic()
        reply = decode_with(client, cluster, params)
        assert reply.status_code == 502
        assert reply.json()["error"]["type"] == "kv_load_failed"
        assert time.monotonic() - started < 20, "the failure must come within the deadline"
        cluster.restart("prefill0")
        ok = through_proxy(client, cluster)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["token_ids"] == want
        assert blocks_in_use(client, cluster.by_name("decode0").url) == 0


def test_prefill_restarted_old_parameters_fail_clearly_then_rehandshake(cluster, want):
    with httpx.Client(timeout=60) as client:
        assert through_proxy(client, cluster).status_code == 200  # decode has a cached handshake
        params = prefill_only(client, cluster)
        cluster.restart("prefill0")
        reply = decode_with(client, cluster, params)
        assert reply.status_code == 502
        assert "restarted" in reply.json()["error"]["message"]
        ok = through_proxy(client, cluster)  # new epoch: decode re-handshakes
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["token_ids"] == want


def stream_long_completion(url: str, result: dict) -> tuple[threading.Thread, threading.Event]:
    """Stream a 2000-token completion from `url` in a thread into `result` (status, body); the
    event is set once the first chunk arrived (decode is generating), or when the stream ended."""
    generating = threading.Event()

    def stream() -> None:
        try:
            with httpx.Client(timeout=90) as client, client.stream(
                    "POST", f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2000, "stream": True}) as reply:
                result["status"], chunks = reply.status_code, []
                for chunk in reply.iter_raw():
                    chunks.append(chunk)
                    generating.set()
                result["body"] = b"".join(chunks)
        finally:
            generating.set()

    thread = threading.Thread(target=stream)
    thread.start()
    return thread, generating


def test_decode_killed_mid_generation_gives_an_error_not_a_hang(cluster, want):
    result: dict = {}
    thread, generating = stream_long_completion(cluster.url, result)
    assert generating.wait(60) and "body" not in result, "the stream ended before the kill"
    cluster.kill("decode0")
    thread.join(60)
    assert not thread.is_alive(), "the client hung"
    assert result["status"] == 200 and b"decode_failed" in result["body"]
    cluster.restart("decode0")
    with httpx.Client(timeout=60) as client:
        ok = through_proxy(client, cluster)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["token_ids"] == want


def test_no_block_leaked_after_leases_expire(cluster):
    with httpx.Client(timeout=60) as client:
        prefill_only(client, cluster)  # a lease nobody will ever confirm
        prefill_url = cluster.by_name("prefill0").url
        assert blocks_in_use(client, prefill_url) > 0
        time.sleep(LEASE_S + 1.0)
        assert blocks_in_use(client, prefill_url) == 0
        assert blocks_in_use(client, cluster.by_name("decode0").url) == 0


def test_forged_block_ids_are_refused_before_any_read(cluster):
    """Parameters travel through clients: a block list that is not the lease's is never read."""
    with httpx.Client(timeout=60) as client:
        victim = prefill_only(client, cluster)
        forged = prefill_only(client, cluster)
        forged["block_ids"] = victim["block_ids"]  # another request's KV
        reply = decode_with(client, cluster, forged)
        assert reply.status_code == 502
        assert "fail their MAC check" in reply.json()["error"]["message"]
        ok = decode_with(client, cluster, victim)
        assert ok.status_code == 200, ok.text



def test_a_single_rank_killed_mid_request_makes_the_service_exit_promptly(tmp_path):
    """Decode TP 4, rank 2 SIGKILLed mid-generation: ranks 1 and 3 see the reset and move on, rank 0
    waits in the collective on a live peer. The service must still exit (so that its supervisor
    restarts it) within seconds, not hang in a graceful shutdown behind that request, and the
    request gets an error, not a hang."""
    import os
    import signal

    from kvxfer.soak.procs import rank_pids

    tp4 = LocalCluster(tmp_path, [ServiceSpec("prefill", 1, extra=FAST)], [ServiceSpec("decode", 4, extra=FAST)],
                       preset="tiny", log_level="WARNING", proxy_args=("--request-timeout-s", "60"))
    tp4.start(timeout_s=300)
    try:
        decode = tp4.by_name("decode0")
        result: dict = {}
        thread, generating = stream_long_completion(tp4.url, result)
        assert generating.wait(60) and "body" not in result, "the stream ended before the kill"
        workers = rank_pids(decode.proc.pid)[1:]
        assert len(workers) == 3, workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        decode.proc.wait(60)
        assert time.monotonic() - killed < 20, "the service took too long to exit after a rank died"
        thread.join(90)
        assert not thread.is_alive(), "the client hung"
        assert b"error" in result["body"], result["body"][-300:]
    finally:
        tp4.stop()


def metric(client: httpx.Client, url: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in client.get(f"{url}/metrics").text.splitlines()
               if line.startswith(name))


@pytest.mark.parametrize("path", ["staged", "direct"])
def test_stalled_producer_never_writes_into_reused_memory(tmp_path, want, path):
    """WRITE while one producer rank is frozen (SIGSTOP) past the consumer's deadline: the
    request fails clearly; its staging slot (staged) or its blocks (direct) stay out of the pool
    until no push started in time can land; when the rank wakes it refuses the stale push instead
    of writing into memory the consumer may have reused; afterwards everything is back and
    requests work."""
    staging = ("--staging-mib", "8", "--staging-slots", "2", *FAST)
    with LocalCluster(tmp_path, [ServiceSpec("prefill", 2, extra=staging)],
                      [ServiceSpec("decode", 1, extra=(*staging, "--transfer-path", path))],
                      preset="tiny", mode="write", log_level="WARNING") as cluster, httpx.Client(timeout=60) as client:
        decode, prefill = cluster.by_name("decode0").url, cluster.by_name("prefill0").url
        first = decode_with(client, cluster, prefill_only(client, cluster))  # handshakes now cached
        assert first.status_code == 200 and first.json()["kvxfer"]["path"] == path, first.text
        params = prefill_only(client, cluster)
        rank1 = rank_pids(cluster.by_name("prefill0").proc.pid)[1]
        os.kill(rank1, signal.SIGSTOP)
        try:
            started = time.monotonic()
            reply = decode_with(client, cluster, params)
            waited = time.monotonic() - started
            assert reply.status_code == 502 and reply.json()["error"]["type"] == "kv_load_failed", reply.text
            if path == "staged":
                held = metric(client, decode, "kvxfer_staging_slots_free") == 1
            else:
                held = blocks_in_use(client, decode) > 0
            # Nothing is released before the push's not-after time (at least the transfer deadline
            # plus the time a producer has to start it): the decode rank waited that long for the
            # frozen rank (which cannot refuse), or it holds the memory back until then.
            assert held or waited >= TRANSFER_DEADLINE_S + REQUEST_TIMEOUT_S, (held, waited)
            time.sleep(max(0.0, 12.0 - (time.monotonic() - started)))  # past the push's not-after time
        finally:
            os.kill(rank1, signal.SIGCONT)
        # The woken rank writes nothing: it refuses the stale push (too late for the consumer, or,
        # if its own lease expiry ran first, for a lease that has ended), or the push request
        # never reaches it: the decode rank, giving up on that rank, dropped its NIXL connection
        # to the producer, which cancels a notification not yet delivered. (The refusal itself:
        # tests/test_protocol_roles.py::test_a_push_asked_for_too_late_is_refused_and_writes_nothing.)
        deadline = time.monotonic() + 30
        refusals = ('kvxfer_failures_total{kind="timeout"}', 'kvxfer_failures_total{kind="lease"}')
        withdrawn = "stopped answering while its push was awaited"
        while (sum(metric(client, prefill, r) for r in refusals) < 1
               and withdrawn not in cluster.by_name("decode0").log_path.read_text() and time.monotonic() < deadline):
            time.sleep(0.2)
        log = cluster.by_name("prefill0").log_path.read_text()
        assert ("refusing to write into memory it may have reused" in log
                or re.search(r"push of \w+ to decode0 rank 0 refused: .* its lease on rank 1 has ended", log)
                or withdrawn in cluster.by_name("decode0").log_path.read_text()), log
        while (metric(client, decode, "kvxfer_staging_slots_free") < 2 or blocks_in_use(client, decode) > 0) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert metric(client, decode, "kvxfer_staging_slots_free") == 2 and blocks_in_use(client, decode) == 0
        ok = decode_with(client, cluster, prefill_only(client, cluster))
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["token_ids"] == want and ok.json()["kvxfer"]["path"] == path


def test_a_request_that_finds_no_free_staging_slot_moves_directly(tmp_path, want):
    """Back-pressure, then the direct path: the decode service's only staging slot is held back
    after a staged request failed while one producer rank may still push into it (prefill rank
    0 refused at once, its lease ended; rank 1 frozen), so the next request waits for a slot up
    to its deadline, gives up on staging and moves its KV directly once rank 1 wakes: a right
    answer, reported as direct, and the slot comes back once no late write can land in it.
    `--transfer-path staged`: every request asks for a slot (with `auto` the cost model learns
    from the request that waited for a slot what staging cost it, and moves the next directly).
    Leases of 60 s: the frozen rank must not expire the held request on waking."""
    from kvxfer.agents.keys import KeyConfig, load_keypair, load_public_key
    from kvxfer.agents.sidechannel import ClientConfig, SideChannelClient

    staging = ("--staging-mib", "8", "--staging-slots", "1", "--lease-s", "60",
               "--transfer-deadline-s", str(TRANSFER_DEADLINE_S))
    with LocalCluster(tmp_path, [ServiceSpec("prefill", 2, extra=staging)],
                      [ServiceSpec("decode", 1, extra=(*staging, "--transfer-path", "staged"))],
                      preset="tiny", mode="write", log_level="INFO") as cluster, httpx.Client(timeout=60) as client:
        decode, prefill = cluster.by_name("decode0").url, cluster.by_name("prefill0")
        first = decode_with(client, cluster, prefill_only(client, cluster))  # handshakes now cached
        assert first.status_code == 200 and first.json()["kvxfer"]["path"] == "staged", first.text
        failing, waiting = prefill_only(client, cluster), prefill_only(client, cluster)
        rank1 = rank_pids(prefill.proc.pid)[1]
        os.kill(rank1, signal.SIGSTOP)
        try:
            keys = tmp_path / "keys"  # as decode0 would, when it gives up on a request
            channel = SideChannelClient(f"tcp://127.0.0.1:{prefill.side_port}", ClientConfig(
                keys=KeyConfig(own=load_keypair(keys / "decode.key_secret"),
                               server_public_key=load_public_key(keys / "prefill.key"))))
            with channel:
                channel.request(m.Abort(request_id=failing["request_id"], reason="the test ends it on rank 0"),
                                timeout_s=10)
            failed = decode_with(client, cluster, failing)
            assert failed.status_code == 502 and "has ended" in failed.text, failed.text
            assert metric(client, decode, "kvxfer_staging_slots_free") == 0  # rank 1 may still push into it
            moved: list[httpx.Response] = []
            loading = threading.Thread(target=lambda: moved.append(decode_with(client, cluster, waiting)))
            loading.start()
            log = cluster.by_name("decode0").log_path
            deadline = time.monotonic() + 60
            while "no staging slot freed in time" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            os.kill(rank1, signal.SIGCONT)
        loading.join(60)
        assert moved and moved[0].status_code == 200, moved[0].text if moved else "no answer"
        assert moved[0].json()["choices"][0]["token_ids"] == want
        assert moved[0].json()["kvxfer"]["path"] == "direct"
        assert metric(client, decode, 'kvxfer_transfer_path_total{op="write",path="direct"}') == 1
        deadline = time.monotonic() + 30
        while metric(client, decode, "kvxfer_staging_slots_free") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        again = decode_with(client, cluster, prefill_only(client, cluster))
        assert again.status_code == 200 and again.json()["kvxfer"]["path"] == "staged", again.text
        assert again.json()["choices"][0]["token_ids"] == want


class Intruder:
    """A consumer rank of our own, in this process: a real NIXL agent and cache (the tiny
    preset's) and a side channel holding a CURVE key the prefill allows. It handshakes as engine
    `engine_id`, then sends push requests it signs with the key it was given, as kvxfer's
    consumer would, but for requests and blocks of its choosing (the checks a genuine consumer
    makes first are skipped)."""

    def __init__(self, keys, server_key: bytes, engine_id: str) -> None:
        import argparse

        from kvxfer.agents.consumer import Consumer
        from kvxfer.agents.endpoint import Endpoint, Identity
        from kvxfer.agents.heartbeat import LeaseClient
        from kvxfer.agents.keys import KeyConfig
        from kvxfer.agents.nixl_agent import AgentConfig
        from kvxfer.agents.sidechannel import ClientCache, ClientConfig
        from kvxfer.daemons.config import add_serve_arguments, serve_config_from_args
        from kvxfer.daemons.rank_setup import engine_config, model_fingerprint
        from kvxfer.engine import Engine

        parser = argparse.ArgumentParser()
        add_serve_arguments(parser)
        config = engine_config(serve_config_from_args(parser.parse_args(
            ["decode", "--preset", "tiny", "--num-blocks", "64", "--insecure-plaintext"]), environ={}))
        engine = Engine(config)
        identity = Identity(engine_id=engine_id, boot_epoch=1, role=m.Role.DECODE, tp_size=1, tp_rank=0,
                            model_fingerprint=model_fingerprint(config))
        self.endpoint = Endpoint(identity, engine.caches, engine.cache_desc, agent_config=AgentConfig(name=engine_id))
        clients = ClientCache(ClientConfig(keys=KeyConfig(own=keys, server_public_key=server_key)))
        self.consumer = Consumer(self.endpoint, clients=clients, leases=LeaseClient(clients, timeout_s=10),
                                 nixl_lock=threading.RLock(), identity=f"key:{keys.public.decode()}",
                                 handshake_timeout_s=30, request_timeout_s=30)

    def ask(self, params: m.TransferParams, *, decode_engine_id: str) -> str:
        """Ask producer rank 0 for a push of `params`' request into our blocks 0.., naming
        `decode_engine_id`; the producer's refusal, as the consumer rank reads it."""
        from kvxfer.agents import capability

        link = self.consumer.link(params, 0)
        ask = capability.sign_ask(m.PushAsk(request_id=params.request_id, decode_rank=0,
                                            block_ids=list(range(len(params.block_ids))),
                                            decode_engine_id=decode_engine_id, not_after_unix=time.time() + 30),
                                  link.ask_key)
        with self.consumer.nixl_lock:
            self.endpoint.agent.send_notif(link.peer.agent_name, m.encode_notif(ask))
        with pytest.raises(AuthError) as refused:
            self.consumer.inbox.wait(params.request_id, m.NotifKind.PUSHED, {0: link.peer.agent_name},
                                     timeout_s=30, what=lambda ranks: "the intruder's push")
        return str(refused.value)

    def close(self) -> None:
        self.consumer.close()
        self.endpoint.close()


def test_a_consumer_cannot_aim_a_push_at_another_decode_service(tmp_path):
    """A key the prefill allows (a compromised or buggy consumer) handshakes as itself and, in
    push requests it signs correctly, asks for a push of a request of its own into another
    decode service's blocks by naming that service's engine id, then for a push of that
    service's own request into its own blocks. The producer pushes only to the engine that
    handshook with the key that signed the request, and only requests bound to that key: it
    refuses both, saying why, and the other service's KV is untouched (its next answer is
    still right)."""
    from kvxfer.agents.keys import generate_keypair, load_public_key, write_keypair

    keys = tmp_path / "keys"
    attacker = generate_keypair()
    write_keypair(attacker, keys, "attacker")
    (keys / "allowed-by-prefill").mkdir(parents=True)
    (keys / "allowed-by-prefill" / "attacker.key").write_bytes((keys / "attacker.key").read_bytes())
    with LocalCluster(tmp_path, [ServiceSpec("prefill", 1, extra=FAST)], [ServiceSpec("decode", 1, extra=FAST)],
                      preset="tiny", mode="write", log_level="WARNING") as cluster, httpx.Client(timeout=60) as client:
        victim = decode_with(client, cluster, prefill_only(client, cluster))  # decode0 handshakes
        assert victim.status_code == 200, victim.text
        prefill = cluster.by_name("prefill0")
        own = client.post(f"{prefill.url}/v1/completions", json={
            "prompt": PROMPT, "max_tokens": MAX_TOKENS,
            "kvxfer_consumer": {"consumer_key": attacker.public.decode()}}).json()["kv_transfer_params"]
        theirs = prefill_only(client, cluster)  # held for decode0, which never asks for it
        intruder = Intruder(attacker, load_public_key(keys / "prefill.key"), "intruder")
        writes = metric(client, prefill.url, 'kvxfer_transfers_total{op="write"}')
        try:
            refused = intruder.ask(m.decode_params(json.dumps(own)), decode_engine_id="decode0")
            assert "decode intruder rank 0 asked for a push to decode decode0 rank 0; refusing" in refused
            refused = intruder.ask(m.decode_params(json.dumps(theirs)), decode_engine_id="intruder")
            assert "request is bound to consumer" in refused
        finally:
            intruder.close()
        assert metric(client, prefill.url, 'kvxfer_transfers_total{op="write"}') == writes  # nothing pushed
        assert metric(client, prefill.url, 'kvxfer_failures_total{kind="auth"}') >= 2
        assert "asked for a push to decode decode0" in prefill.log_path.read_text()
        again = decode_with(client, cluster, prefill_only(client, cluster))
        assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == reference(PROMPT)


@pytest.fixture(scope="module")
def write_cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("faults-write"),
                     [ServiceSpec("prefill", 2, extra=FAST)], [ServiceSpec("decode", 1, extra=FAST)],
                     preset="tiny", mode="write", log_level="WARNING", proxy_args=("--request-timeout-s", "60"))
    c.start(timeout_s=300)
    yield c
    c.stop()


def transfers(client: httpx.Client, cluster: LocalCluster) -> tuple[float, float]:
    """READs decode posted and WRITEs prefill rank 0 posted, so far."""
    return (metric(client, cluster.by_name("decode0").url, 'kvxfer_transfers_total{op="read"}'),
            metric(client, cluster.by_name("prefill0").url, 'kvxfer_transfers_total{op="write"}'))


@pytest.mark.parametrize("mode", ["read", "write"])
@pytest.mark.parametrize("forgery", ["victim_block_ids", "made_up_transfer_id"])
def test_forged_parameters_are_refused_before_any_transfer(request, mode, forgery, want):
    """Another request's blocks, or a transfer id the producer never issued: decode refuses the
    parameters (their MAC) before it reads or asks for a push, so no transfer is posted on either
    side; both genuine requests still load."""
    cluster = request.getfixturevalue("cluster" if mode == "read" else "write_cluster")
    with httpx.Client(timeout=60) as client:
        victim, forged = prefill_only(client, cluster), prefill_only(client, cluster)
        genuine = dict(forged)
        if forgery == "victim_block_ids":
            forged["block_ids"] = victim["block_ids"]
        else:
            forged["request_id"] = "f" * 32
        before = transfers(client, cluster)
        reply = decode_with(client, cluster, forged)
        assert reply.status_code == 502 and "fail their MAC check" in reply.json()["error"]["message"], reply.text
        assert transfers(client, cluster) == before
        for params in (victim, genuine):
            ok = decode_with(client, cluster, params)
            assert ok.status_code == 200 and ok.json()["choices"][0]["token_ids"] == want, ok.text


def test_write_from_a_killed_or_restarted_producer_fails_clearly(write_cluster, want):
    """WRITE: the producer SIGKILLed after prefill, or restarted (new boot epoch): the request
    ends with a typed error within its deadline, naming a restart where there was one; then
    requests work again (decode handshakes with the new epoch) and no block stays held."""
    with httpx.Client(timeout=60) as client:
        assert through_proxy(client, write_cluster).status_code == 200  # handshakes cached
        params = prefill_only(client, write_cluster)
        write_cluster.restart("prefill0")
        reply = decode_with(client, write_cluster, params)
        assert reply.status_code == 502 and "restarted" in reply.json()["error"]["message"], reply.text
        params = prefill_only(client, write_cluster)
        write_cluster.kill("prefill0")
        started = time.monotonic()
        reply = decode_with(client, write_cluster, params)
        assert reply.status_code == 502 and reply.json()["error"]["type"] == "kv_load_failed", reply.text
        assert time.monotonic() - started < 20, "the failure must come within the deadline"
        write_cluster.restart("prefill0")
        ok = through_proxy(client, write_cluster)
        assert ok.status_code == 200 and ok.json()["choices"][0]["token_ids"] == want, ok.text
        decode = write_cluster.by_name("decode0").url
        deadline = time.monotonic() + 30
        while blocks_in_use(client, decode) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert blocks_in_use(client, decode) == 0
