"""The short two-host suite (part of `make test`): the demo model with prefill TP 1 on one host and
decode TP 2 plus the proxy on the other, started as deploy/k8s starts the pods (HTTP on every
address, side channel bound to and advertised with the host's address, the manifests' ports,
CURVE on), NIXL/UCX over TCP between the hosts. A completion crosses the hosts token for token;
the KV bytes really cross the hosts' interfaces (not shared memory, which a partition would not
cut); a partition while prefill holds a lease ends the decode leg with a typed error in bounded
time, and once the link is back requests succeed and nothing stays held."""

from __future__ import annotations

import json
import time

import pytest
from hostkit import Deployment, Setup, namespaces_or_skip, reference, typed_error

from kvxfer.hosts import Topology, netns
from kvxfer.soak.run import scrape

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SETUP = Setup("read", mode="read", decode_tp=2)
PROMPT = [(7 * i) % 250 + 1 for i in range(90)]
MAX_TOKENS = 4
LANDING = "kvxfer_blocks_awaiting_late_reads"
# The decode leg's bound under a partition: side-channel calls and the transfer have deadlines of
# seconds; twice the handshake timeout (10 s) leaves room for a loaded machine and is far below
# the proxy's 60 s, so a hang shows.
ERROR_BOUND_S = 25.0


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    namespaces_or_skip()
    with Topology() as topology, Deployment(topology, SETUP, tmp_path_factory.mktemp("two-hosts")) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def want() -> list[int]:
    return reference(PROMPT, MAX_TOKENS, preset=SETUP.preset)


def listening(host) -> set[str]:
    return {line.split()[3] for line in netns.run_in(host.netns, ["ss", "-Hltn"]).splitlines()}


def test_services_bind_and_advertise_their_hosts_addresses(two_hosts):
    prefill, decode = two_hosts.topology.host("prefill"), two_hosts.topology.host("decode")
    assert {f"{prefill.address}:5600", "0.0.0.0:8100"} <= listening(prefill)
    assert {"0.0.0.0:8200", "0.0.0.0:8000"} <= listening(decode)  # decode and the proxy (its sidecar)
    side = [a for a in listening(prefill) | listening(decode) if a.rpartition(":")[2] in ("5600", "5700", "5701")]
    assert all(a.startswith((prefill.address, decode.address)) for a in side), side  # never 0.0.0.0
    params = json.dumps(two_hosts.prefill_leg(PROMPT, MAX_TOKENS)["kv_transfer_params"])
    assert prefill.address in params and "127.0.0.1" not in params  # what decode dials is prefill's host


def test_a_completion_crosses_the_hosts_over_their_interfaces(two_hosts, want):
    prefill = two_hosts.topology.host("prefill")
    _, sent_before = prefill.counters()
    reply = two_hosts.complete(PROMPT, MAX_TOKENS)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["token_ids"] == want
    assert body["kvxfer"]["bytes"] > 0 and body["kvxfer"]["peers"] >= 1
    # Every KV byte left prefill's host through its eth0: UCX went over TCP, not cma/shared memory.
    assert prefill.counters()[1] - sent_before >= body["kvxfer"]["bytes"]


def test_a_partition_while_a_lease_is_held_fails_typed_then_recovers(two_hosts, want):
    leg = two_hosts.prefill_leg(PROMPT, MAX_TOKENS)  # prefill now holds the blocks under a lease
    with two_hosts.topology.partitioned("prefill"):
        started = time.monotonic()
        reply = two_hosts.post(two_hosts.decode, "/v1/completions", leg, timeout=ERROR_BOUND_S + 30)
        seconds = time.monotonic() - started
        assert reply.status_code >= 500 and typed_error(reply), reply.text
        assert seconds < ERROR_BOUND_S, f"{typed_error(reply)} after {seconds:.1f} s"
        # The READ given up still runs in UCX and lands once the link is back: decode keeps the
        # request's blocks from the pool until then (kvxfer.daemons.landing).
        kept = scrape(two_hosts.cluster, two_hosts.decode, LANDING)
        assert kept.get(LANDING, 0) > 0, kept
    reply = two_hosts.complete(PROMPT, MAX_TOKENS)  # the link is back: a new request succeeds
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["token_ids"] == want
    held = two_hosts.wait_released()  # the stranded lease expired, the new one was released
    assert not any(held.values()), held
