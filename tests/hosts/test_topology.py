"""The topology itself (no kvxfer service): each host has its own address and reaches the other
over the switch, nothing outside the topology is reachable, a cut link stalls traffic both ways
(drops, no reset) until it is restored, and every namespace goes away at the end, also when the
body raised, also when a crashed run left them behind."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from hostkit import namespaces_or_skip

from kvxfer.hosts import Topology, netns, sweep_stale

PORT = 5600


def _listen(host) -> socket.socket:
    with host.entered():
        server = socket.socket()
        server.bind((host.address, PORT))
        server.listen()
    return server


def _connect(host, address: str, timeout: float = 2.0) -> socket.socket:
    with host.entered():
        return socket.create_connection((address, PORT), timeout=timeout)


def test_hosts_have_their_own_addresses_and_reach_each_other(topology):
    prefill, decode = topology.host("prefill"), topology.host("decode")
    assert prefill.address != decode.address
    assert prefill.netns in netns.listed() and decode.netns in netns.listed()
    server = _listen(prefill)
    client = _connect(decode, prefill.address)
    peer, (source, _) = server.accept()
    assert source == decode.address  # it came over the switch, from decode's own address
    client.sendall(b"k" * 100_000)
    received = 0
    while received < 100_000:
        received += len(peer.recv(65536))
    rx, _ = prefill.counters()
    assert rx >= 100_000  # and through prefill's eth0


def test_nothing_outside_the_topology_is_reachable(topology):
    decode = topology.host("decode")
    with decode.entered(), pytest.raises(OSError) as err:
        socket.create_connection(("192.0.2.1", 80), timeout=2.0)  # TEST-NET-1: no route to it
    assert err.value.errno == 101  # ENETUNREACH: no default route, so nothing leaves
    with decode.entered(), pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", PORT), timeout=2.0)  # the host's own loopback is empty


def test_a_cut_link_stalls_both_ways_until_restored(topology):
    prefill, decode = topology.host("prefill"), topology.host("decode")
    server = _listen(prefill)
    client = _connect(decode, prefill.address)
    peer, _ = server.accept()
    with topology.partitioned("prefill"):
        assert topology.is_cut("prefill")
        with pytest.raises(TimeoutError):  # a SYN dropped: a stall, not a refusal
            _connect(decode, prefill.address, timeout=1.0)
        client.sendall(b"queued while the link is down")
        peer.settimeout(1.0)
        with pytest.raises(TimeoutError):
            peer.recv(100)
    assert not topology.is_cut("prefill")
    peer.settimeout(10.0)  # retransmitted once the link is back
    assert peer.recv(100) == b"queued while the link is down"
    _connect(decode, prefill.address).close()


def test_reset_connections_sends_rst_from_inside_the_host(topology):
    prefill, decode = topology.host("prefill"), topology.host("decode")
    server = _listen(prefill)
    client = _connect(decode, prefill.address)
    peer, _ = server.accept()  # held: a collected socket would close (FIN) before the reset
    assert topology.reset_connections("prefill", ports=range(PORT, PORT + 1)) == 1
    client.settimeout(5.0)
    with pytest.raises(ConnectionResetError):
        client.recv(10)


def test_teardown_removes_every_namespace_even_when_the_body_raised():
    namespaces_or_skip()
    with pytest.raises(RuntimeError), Topology() as topology:
        names = [h.netns for h in topology.hosts.values()] + [topology.switch]
        assert set(names) <= set(netns.listed())
        raise RuntimeError("the test failed")
    assert not set(names) & set(netns.listed())


def test_teardown_kills_what_still_runs_in_a_host():
    namespaces_or_skip()
    with Topology() as topology:
        proc = subprocess.Popen(topology.host("decode").command([sys.executable, "-c", "import time; time.sleep(600)"]))
    assert proc.wait(10) == -9


def test_stale_namespaces_of_a_dead_run_are_swept_and_live_ones_kept():
    namespaces_or_skip()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that made namespaces and then died without tearing them down
    stale, mine = f"{netns.PREFIX}{dead.pid}-0-decode", netns.owned_name("keep")
    for name in (stale, mine):
        netns.create(name)
    try:
        assert stale in sweep_stale()
        assert stale not in netns.listed() and mine in netns.listed()
    finally:
        for name in (stale, mine):
            netns.delete(name)
