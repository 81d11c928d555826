"""The side channel over real ZeroMQ on loopback: CURVE refusals, deadlines, typed errors."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from test_sidechannel_support import Keys, Recorder

from kvxfer.agents import messages as m
from kvxfer.agents.keys import KeyConfig
from kvxfer.agents.sidechannel import (
    ClientConfig,
    PeerInfo,
    ServerConfig,
    SideChannelClient,
    SideChannelServer,
    check_binding,
)
from kvxfer.errors import (
    AuthError,
    ConfigError,
    HandshakeError,
    KvxferError,
    LeaseError,
    PeerGoneError,
    TransferTimeout,
)

TIMEOUT_S = 1.0
SLACK_S = 0.5  # scheduling on a shared 2-core machine


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(keys: Keys, recorder: Recorder) -> Iterator[SideChannelServer]:
    with SideChannelServer(keys.server_config(), recorder) as srv:
        yield srv


def request(address: str, config: ClientConfig, msg: m.Message, timeout_s: float = TIMEOUT_S) -> m.Message:
    with SideChannelClient(address, config) as client:
        return client.request(msg, timeout_s=timeout_s)


def timed_error(address: str, config: ClientConfig, msg: m.Message, timeout_s: float = TIMEOUT_S) -> tuple[KvxferError, float]:
    start = time.monotonic()
    with pytest.raises(KvxferError) as info:
        request(address, config, msg, timeout_s)
    return info.value, time.monotonic() - start


def test_allowed_client_is_served_and_identified_by_its_key(server: SideChannelServer, keys: Keys, recorder: Recorder) -> None:
    reply = request(server.address, keys.client_config(), m.Abort(request_id="r1"))
    assert reply == m.Ack(request_id="r1")
    (peer, msg), = recorder.calls
    assert msg == m.Abort(request_id="r1")
    assert peer.public_key == keys.client.public.decode()
    assert peer.address == "127.0.0.1"


def test_ping_is_answered_by_the_server_itself(server: SideChannelServer, keys: Keys, recorder: Recorder) -> None:
    reply = request(server.address, keys.client_config(), m.Ping(nonce=9))
    assert reply == m.Pong(nonce=9, engine_id="prefill-0", boot_epoch=11)
    assert recorder.calls == []


@pytest.mark.parametrize("case", ["unknown client key", "wrong server key", "plaintext client"])
def test_refused_clients_get_nothing_and_an_auth_error(case: str, server: SideChannelServer, keys: Keys, recorder: Recorder) -> None:
    config = {
        "unknown client key": keys.client_config(own=keys.stranger),
        "wrong server key": keys.client_config(server_key=keys.stranger.public),
        "plaintext client": ClientConfig(insecure=True),
    }[case]
    err, elapsed = timed_error(server.address, config, m.HandshakeRequest(engine=_engine()))
    assert isinstance(err, AuthError), err
    assert elapsed < TIMEOUT_S + SLACK_S
    assert recorder.calls == []  # the handler (metadata, addresses) was never reached
    assert server.stats().replied == 0


def test_curve_client_against_an_insecure_server_is_refused(keys: Keys, recorder: Recorder) -> None:
    with SideChannelServer(ServerConfig(insecure=True), recorder) as srv:
        err, elapsed = timed_error(srv.address, keys.client_config(), m.Ping())
    assert isinstance(err, AuthError), err
    assert elapsed < TIMEOUT_S + SLACK_S


def test_insecure_pair_works_and_has_no_peer_key(recorder: Recorder) -> None:
    with SideChannelServer(ServerConfig(insecure=True), recorder) as srv:
        assert request(srv.address, ClientConfig(insecure=True), m.Abort(request_id="x")) == m.Ack(request_id="x")
    assert recorder.calls[0][0].public_key is None


def test_dead_server_raises_peer_gone_within_the_timeout(keys: Keys) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    err, elapsed = timed_error(f"tcp://127.0.0.1:{port}", keys.client_config(), m.Ping(), timeout_s=0.5)
    assert isinstance(err, PeerGoneError), err
    assert 0.4 < elapsed < 0.5 + SLACK_S


def test_listener_that_never_speaks_zmtp_raises_within_the_timeout(keys: Keys) -> None:
    with socket.socket() as silent:  # accepts TCP (kernel backlog), never answers the greeting
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        err, elapsed = timed_error(address, keys.client_config(), m.Ping(), timeout_s=0.5)
    assert isinstance(err, PeerGoneError), err
    assert elapsed < 0.5 + SLACK_S


def test_slow_handler_times_out_and_its_late_reply_is_dropped(keys: Keys) -> None:
    release = threading.Event()

    def handler(peer: PeerInfo, msg: m.Message) -> m.Message:
        if isinstance(msg, m.Abort) and msg.request_id == "slow":
            release.wait(2.0)
        return m.Ack(request_id=getattr(msg, "request_id", ""))

    with SideChannelServer(keys.server_config(), handler) as srv, SideChannelClient(srv.address, keys.client_config()) as client:
        start = time.monotonic()
        with pytest.raises(TransferTimeout):
            client.request(m.Abort(request_id="slow"), timeout_s=0.3)
        assert time.monotonic() - start < 0.3 + SLACK_S
        release.set()
        assert client.request(m.Abort(request_id="next"), timeout_s=TIMEOUT_S) == m.Ack(request_id="next")


def test_a_call_sent_now_is_answered_later_and_its_untaken_reply_never_reaches_the_next(keys: Keys) -> None:
    release, handled = threading.Event(), threading.Event()

    def handler(peer: PeerInfo, msg: m.Message) -> m.Message:
        if isinstance(msg, m.LeaseRenew):
            raise LeaseError("request r9 expired")
        if isinstance(msg, m.Abort) and msg.request_id == "held":
            release.wait(2.0)
            handled.set()
        return m.Ack(request_id=getattr(msg, "request_id", ""))

    with SideChannelServer(keys.server_config(), handler) as srv, SideChannelClient(srv.address, keys.client_config()) as client:
        client.request(m.Ping(), timeout_s=TIMEOUT_S)  # connected: `call` sends without waiting
        with client.call(m.Abort(request_id="held"), timeout_s=TIMEOUT_S) as pending:
            assert pending.poll() is None  # sent, not answered: the handler waits for `release`
            release.set()
            assert pending.wait() == m.Ack(request_id="held")
            assert pending.poll() == m.Ack(request_id="held")  # taken once, kept
            # a taken reply frees the client at once: another thread's call need not wait for close
            answers: list[m.Message] = []
            other = threading.Thread(target=lambda: answers.append(
                client.request(m.Abort(request_id="other"), timeout_s=TIMEOUT_S)))
            other.start()
            other.join(TIMEOUT_S + SLACK_S)
            assert answers == [m.Ack(request_id="other")]
        with client.call(m.LeaseRenew(request_ids=["r9"]), timeout_s=TIMEOUT_S) as pending:
            with pytest.raises(LeaseError, match="r9 expired"):
                pending.wait()
        release.clear()
        handled.clear()
        with client.call(m.Abort(request_id="held"), timeout_s=TIMEOUT_S):
            release.set()
        assert handled.wait(TIMEOUT_S)  # its Ack is on its way, untaken: the next call must skip it
        assert client.request(m.Abort(request_id="next"), timeout_s=TIMEOUT_S) == m.Ack(request_id="next")


def test_handler_errors_become_typed_errors_and_the_server_keeps_serving(keys: Keys) -> None:
    def handler(peer: PeerInfo, msg: m.Message) -> m.Message:
        if isinstance(msg, m.LeaseRenew):
            raise LeaseError("request r9 expired")
        if isinstance(msg, m.Abort):
            raise ValueError("a bug")
        return "not a message"  # type: ignore[return-value]

    with SideChannelServer(keys.server_config(), handler) as srv, SideChannelClient(srv.address, keys.client_config()) as client:
        with pytest.raises(LeaseError, match="r9 expired"):
            client.request(m.LeaseRenew(request_ids=["r9"]), timeout_s=TIMEOUT_S)
        with pytest.raises(KvxferError, match="internal") as info:
            client.request(m.Abort(request_id="r1"), timeout_s=TIMEOUT_S)
        assert "a bug" not in str(info.value)  # internals stay on the server
        with pytest.raises(KvxferError, match="internal"):
            client.request(m.Ack(request_id="r1"), timeout_s=TIMEOUT_S)
        assert client.request(m.Ping(), timeout_s=TIMEOUT_S) == m.Pong(engine_id="prefill-0", boot_epoch=11)
        assert srv.stats().handler_errors == 2


def test_other_protocol_version_is_refused_by_version(server: SideChannelServer, keys: Keys, recorder: Recorder) -> None:
    with pytest.raises(HandshakeError, match="protocol_version=99"):
        request(server.address, keys.client_config(), m.Ping(protocol_version=99))
    assert recorder.calls == []


def test_client_reconnects_to_a_restarted_server(keys: Keys, recorder: Recorder) -> None:
    with SideChannelServer(keys.server_config(), recorder) as first:
        port = int(first.address.rsplit(":", 1)[1])
        client = SideChannelClient(first.address, keys.client_config())
        assert isinstance(client.request(m.Ping(), timeout_s=TIMEOUT_S), m.Pong)
    with pytest.raises((PeerGoneError, TransferTimeout)):
        client.request(m.Ping(), timeout_s=0.3)
    with SideChannelServer(keys.server_config(port=port), recorder):
        assert isinstance(client.request(m.Ping(), timeout_s=2.0), m.Pong)
    client.close()


def test_defaults_listen_on_loopback_and_require_a_security_choice(keys: Keys) -> None:
    assert ServerConfig(insecure=True).host == "127.0.0.1"
    with pytest.raises(ConfigError, match="CURVE keys are required"):
        ServerConfig()
    with pytest.raises(ConfigError, match="choose one"):
        ServerConfig(insecure=True, keys=KeyConfig(own=keys.server))
    # A client may be configured without a server key (the vLLM connector's drop-in mode takes it
    # from each request), but none can be made without one.
    with pytest.raises(ConfigError, match="no server key"):
        SideChannelClient("tcp://127.0.0.1:1", ClientConfig(keys=KeyConfig(own=keys.client)))


def test_keys_are_never_logged(keys: Keys, recorder: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with SideChannelServer(keys.server_config(), recorder) as srv:
        request(srv.address, keys.client_config(), m.Ping())
        for config in (keys.client_config(own=keys.stranger), ClientConfig(insecure=True)):
            with pytest.raises(KvxferError):
                request(srv.address, config, m.Ping(), timeout_s=0.3)
        with pytest.raises(KvxferError):
            request(srv.address, keys.client_config(), m.Ping(protocol_version=7))
    assert "refused a client" in caplog.text
    for pair in (keys.server, keys.client, keys.stranger):
        assert pair.public.decode() not in caplog.text
        assert pair.secret.decode() not in caplog.text


def test_binding_admits_only_the_bound_consumer(keys: Keys) -> None:
    bound = m.Binding(consumer_key=keys.client.public.decode(), consumer_engine_id="decode-1")
    me = PeerInfo(routing_id=b"r", public_key=keys.client.public.decode(), address="127.0.0.1")
    thief = PeerInfo(routing_id=b"t", public_key=keys.stranger.public.decode(), address="127.0.0.1")
    check_binding(me, bound)
    with pytest.raises(AuthError, match="bound to consumer key:"):
        check_binding(thief, bound)
    with pytest.raises(AuthError, match="no consumer key"):
        check_binding(me, m.Binding(consumer_engine_id="decode-1"))
    insecure = PeerInfo(routing_id=b"i", public_key=None, address="127.0.0.1")
    check_binding(insecure, bound, engine_id="decode-1")
    with pytest.raises(AuthError, match="decode-2"):
        check_binding(insecure, bound, engine_id="decode-2")


def _engine() -> m.EngineInfo:
    return m.EngineInfo(
        engine_id="decode-0",
        boot_epoch=1,
        role=m.Role.DECODE,
        tp_size=1,
        tp_rank=0,
        model_fingerprint="tiny",
        agent_name="agent-d0",
        agent_metadata=b"metadata",
        regions=[],
    )


def test_a_port_in_use_is_a_config_error(server: SideChannelServer, keys: Keys, recorder: Recorder) -> None:
    port = int(server.address.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
        SideChannelServer(keys.server_config(port=port), recorder).start()
    assert isinstance(request(server.address, keys.client_config(), m.Ping()), m.Pong)


def test_a_call_queued_behind_a_slow_one_still_meets_its_deadline(keys: Keys) -> None:
    arrived, release = threading.Event(), threading.Event()

    def handler(peer: PeerInfo, msg: m.Message) -> m.Message:
        arrived.set()
        release.wait(2.0)
        return m.Ack()

    with SideChannelServer(keys.server_config(), handler) as srv, SideChannelClient(srv.address, keys.client_config()) as client:
        results: list[m.Message] = []
        slow = threading.Thread(target=lambda: results.append(client.request(m.Abort(request_id="a"), timeout_s=3.0)))
        slow.start()
        assert arrived.wait(5.0)  # the slow call is at the server, so the client is busy with it
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="behind another call"):
            client.request(m.Ping(), timeout_s=0.2)
        assert time.monotonic() - start < 0.2 + SLACK_S
        release.set()
        slow.join(5.0)
    assert results == [m.Ack()]


SERVER_SCRIPT = """
import sys, time
from kvxfer.agents import messages as m
from kvxfer.agents.keys import KeyConfig, KeyPair
from kvxfer.agents.sidechannel import ServerConfig, SideChannelServer
keys = KeyConfig(own=KeyPair.from_secret(sys.argv[1]), allowed_client_keys=frozenset({sys.argv[2].encode()}))
with SideChannelServer(ServerConfig(keys=keys), lambda peer, msg: time.sleep(60) or m.Ack()) as srv:
    print(srv.address, flush=True)
    time.sleep(60)
"""


def test_server_killed_mid_request_is_peer_gone_before_the_deadline(keys: Keys) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, keys.server.secret.decode(), keys.client.public.decode()],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        address = proc.stdout.readline().strip() if proc.stdout else ""
        threading.Timer(0.3, proc.kill).start()
        start = time.monotonic()
        with pytest.raises(PeerGoneError, match="connection lost"):
            request(address, keys.client_config(), m.Abort(request_id="r"), timeout_s=5.0)
        assert time.monotonic() - start < 0.3 + 1.5
    finally:
        proc.kill()
        proc.wait(5)
