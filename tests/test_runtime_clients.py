"""Side-channel clients a rank keeps, by producer address: bounded, least recently used first out
(addresses arrive in transfer parameters, which HTTP clients send)."""

from __future__ import annotations

from kvxfer.agents.sidechannel import ClientCache, ClientConfig


def test_client_cache_keeps_at_most_capacity_and_evicts_the_least_recently_used():
    cache = ClientCache(ClientConfig(insecure=True), capacity=3)
    a, b, c = (cache.get(f"tcp://127.0.0.1:{p}") for p in (1, 2, 3))
    assert cache.get("tcp://127.0.0.1:1") is a  # reused, and now the most recent
    cache.get("tcp://127.0.0.1:4")
    assert len(cache) == 3
    assert cache.get("tcp://127.0.0.1:3") is c
    assert cache.get("tcp://127.0.0.1:2") is not b  # b was evicted (and closed)
    for port in range(100, 1100):  # a flood of forged addresses stays bounded
        cache.get(f"tcp://127.0.0.1:{port}")
    assert len(cache) == 3
    cache.close()
    assert len(cache) == 0
