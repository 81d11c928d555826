"""Completion ids reach end users through the proxy: they must not reveal the request id, which
is the capability the side channel acts on."""

from __future__ import annotations

from kvxfer.agents.messages import new_request_id
from kvxfer.daemons.api import completion_id


def test_completion_id_is_stable_and_reveals_no_part_of_the_request_id():
    for _ in range(200):
        rid = new_request_id()
        cid = completion_id(rid)
        assert cid == completion_id(rid) and cid.startswith("cmpl-")
        assert rid[:16] not in cid and rid[-16:] not in cid
    assert completion_id("a" * 32) != completion_id("a" * 31 + "b")
