"""Partitions between prefill's host and decode's, at the moments only a network can choose: during
the first handshake, during a transfer (READ, WRITE direct, WRITE staged), and while prefill holds
a lease. Each time the request in flight ends with a typed error within a bound (never a hang),
the link comes back, a new request is answered token for token (decode re-handshakes where it
must), and no block or staging slot stays held once leases expire. The `small-gpu` model (16 KiB
of KV per token) makes a 4,000-token transfer last long enough (64 MiB over TCP) to cut the link
inside it. Long: `make test-hosts` runs these (marker hosts_full).

A partition that outlasts UCX's keepalive (between 15 s and 30 s here) has UCX declare the peer's
endpoint gone; the side that posts must then meet its peer again
(test_a_partition_that_outlasts_ucx_keepalive_heals)."""

from __future__ import annotations

import time

import pytest
from hostkit import (
    Deployment,
    Leg,
    Setup,
    cut_when_bytes_flow,
    kv_bytes,
    namespaces_or_skip,
    reference,
    typed_error,
)

from kvxfer.hosts import Topology

pytestmark = [pytest.mark.slow, pytest.mark.hosts_full, pytest.mark.timeout(1200)]
PRESET = "small-gpu"
SETUPS = [
    Setup("read-direct", mode="read", preset=PRESET, num_blocks=640, proxy_timeout_s=20.0),
    Setup("write-direct", mode="write", transfer_path="direct", preset=PRESET, num_blocks=640, proxy_timeout_s=20.0),
    Setup("write-staged", mode="write", transfer_path="staged", staging_mib=192, preset=PRESET, num_blocks=640,
          proxy_timeout_s=20.0),
]
SHORT = [(5 * i) % 1000 + 1 for i in range(100)]
LONG = [(3 * i) % 1000 + 1 for i in range(2000)]  # 32 MiB of KV
MAX_TOKENS = 3
ERROR_BOUND_S = 25.0  # see test_two_hosts.py
HANDSHAKE_BYTES = 256  # prefill's ZMTP greeting and CURVE WELCOME are out: the handshake is under way
TRANSFER_BYTES = 1 << 20  # bulk KV is flowing
LONG_PARTITION_S = 30.0
ATTEMPTS = 3  # a cut that lands after the leg ended (a starved poller) is tried again


@pytest.fixture(scope="module", params=SETUPS, ids=lambda s: s.name)
def two_hosts(request, tmp_path_factory):
    namespaces_or_skip()
    setup = request.param
    with Topology() as topology, Deployment(topology, setup, tmp_path_factory.mktemp(setup.name)) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def want() -> list[int]:
    return reference(SHORT, MAX_TOKENS, preset=PRESET)


def fails_typed_in_bound(leg: Leg) -> str:
    leg.join(ERROR_BOUND_S + 30)
    assert not leg.is_alive(), "the decode leg hung"
    assert leg.error is None, repr(leg.error)
    assert leg.reply.status_code >= 500 and typed_error(leg.reply), leg.reply.text
    assert leg.seconds < ERROR_BOUND_S, f"{typed_error(leg.reply)} after {leg.seconds:.1f} s"
    return typed_error(leg.reply)


def recovers(two_hosts: Deployment, want: list[int]) -> None:
    """The link is back: a new request through the proxy is answered token for token, and once
    the stranded lease expired nothing is held anywhere."""
    reply = two_hosts.complete(SHORT, MAX_TOKENS)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["token_ids"] == want
    held = two_hosts.wait_released()
    assert not any(held.values()), held


def cut_inside(two_hosts: Deployment, prompt: list[int], *, role: str, threshold: int) -> tuple[Leg, int]:
    for _ in range(ATTEMPTS):
        leg = Leg(two_hosts, two_hosts.prefill_leg(prompt, MAX_TOKENS))
        sent = cut_when_bytes_flow(two_hosts.topology, role=role, threshold=threshold, leg=leg)
        if sent >= 0:
            return leg, sent
        assert leg.reply is not None and leg.reply.status_code == 200, leg.reply  # missed, but answered
    pytest.fail(f"the leg ended {ATTEMPTS} times before {threshold} bytes left {role}'s host")


def test_link_down_during_the_first_handshake(two_hosts, want):
    """Decode has never met this prefill: its first request handshakes, and the link goes down
    as soon as prefill's side of the handshake starts coming back."""
    leg, _ = cut_inside(two_hosts, SHORT, role="prefill", threshold=HANDSHAKE_BYTES)
    try:
        fails_typed_in_bound(leg)
    finally:
        two_hosts.topology.restore("prefill")
    recovers(two_hosts, want)


def test_link_down_during_a_transfer(two_hosts, want):
    leg, sent = cut_inside(two_hosts, LONG, role="prefill", threshold=TRANSFER_BYTES)
    try:
        assert sent < kv_bytes(PRESET, len(LONG)), "the cut came after the whole KV had left"
        fails_typed_in_bound(leg)
    finally:
        two_hosts.topology.restore("prefill")
    recovers(two_hosts, want)


def test_link_down_while_a_lease_is_held(two_hosts, want):
    """Cut after prefill granted the lease and before decode came for the KV; stay cut until the
    lease expired: prefill frees the blocks on its own (read from inside prefill's host, which the
    partition does not hide), then the link comes back."""
    body = two_hosts.prefill_leg(SHORT, MAX_TOKENS)
    granted = time.monotonic()
    with two_hosts.topology.partitioned("prefill"):
        leg = Leg(two_hosts, body)
        leg.start()
        fails_typed_in_bound(leg)
        deadline = granted + two_hosts.setup.lease_s + 10
        while (held := two_hosts.held())["prefill0 kvxfer_blocks_held"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert held["prefill0 kvxfer_blocks_held"] == 0, held
    recovers(two_hosts, want)


def test_a_partition_that_outlasts_ucx_keepalive_heals(two_hosts, want):
    """30 s cut: the proxy answers a typed error within its own bound meanwhile; after it, new
    requests must be answered again."""
    with two_hosts.topology.partitioned("prefill"):
        started = time.monotonic()
        reply = two_hosts.complete(SHORT, MAX_TOKENS)
        assert reply.status_code >= 500 and typed_error(reply), reply.text
        assert time.monotonic() - started < two_hosts.setup.proxy_timeout_s + 10
        time.sleep(max(0.0, LONG_PARTITION_S - (time.monotonic() - started)))  # the fault is a duration
    recovers(two_hosts, want)
