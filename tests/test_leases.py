"""Leases: table-driven behaviour plus a stateful property test: random interleavings of acquire,
confirm, renew, abort and expire never free a block twice and, once everything expired, leak none."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvxfer.agents.leases import LeaseTable, Outcome
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.errors import ConfigError, LeaseError


def test_last_confirm_frees_blocks_once():
    table = LeaseTable(ttl_s=10)
    table.acquire("r1", [3, 4], ["d0", "d1"], now=0)
    assert table.confirm("r1", "d0", now=1) is None
    assert table.confirm("r1", "d0", now=1.5) is None  # repeated confirm is harmless
    released = table.confirm("r1", "d1", now=2)
    assert released is not None
    assert released.blocks == (3, 4) and released.outcome is Outcome.CONFIRMED
    assert table.num_blocks_held == 0 and not table.holds("r1")
    with pytest.raises(LeaseError, match="not held"):
        table.confirm("r1", "d1", now=3)


def test_expiry_and_renewal():
    table = LeaseTable(ttl_s=5)
    table.acquire("r1", [1], ["d0"], now=0)
    table.acquire("r2", [2], ["d0"], now=1)
    assert table.renew("r1", "d0", now=4) == 9
    assert [r.request_id for r in table.expire(6)] == ["r2"]
    with pytest.raises(LeaseError, match="expired"):
        table.confirm("r1", "d0", now=9)  # past expiry: only expire() or abort() end it
    (released,) = table.expire(9)
    assert released.outcome is Outcome.EXPIRED and released.blocks == (1,)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: t.acquire("r1", [9], ["d0"], now=0), "already holds"),
        (lambda t: t.acquire("r2", [1], ["d0"], now=0), "block 1 is held by request r1"),
        (lambda t: t.acquire("r2", [7, 7], ["d0"], now=0), "repeat"),
        (lambda t: t.acquire("r2", [8], [], now=0), "at least one consumer"),
        (lambda t: t.confirm("r1", "d9", now=0), "not one of the consumers"),
        (lambda t: t.renew("nope", "d0", now=0), "not held"),
        (lambda t: t.abort("nope"), "not held"),
    ],
)
def test_errors_say_what(call, match):
    table = LeaseTable(ttl_s=5)
    table.acquire("r1", [1, 2], ["d0"], now=0)
    with pytest.raises(LeaseError, match=match):
        call(table)
    assert table.num_blocks_held == 2


def test_bad_ttl():
    with pytest.raises(ConfigError):
        LeaseTable(ttl_s=0)


def test_metrics_follow_the_table():
    metrics = TransferMetrics()
    table = LeaseTable(ttl_s=5, metrics=metrics)
    table.acquire("r1", [1, 2], ["d0"], now=0)
    table.acquire("r2", [3], ["d0"], now=0)
    assert metrics.value("kvxfer_blocks_held") == 3
    table.abort("r1")
    table.expire(100)
    assert metrics.value("kvxfer_blocks_held") == 0
    assert metrics.value("kvxfer_leases_active") == 0
    assert metrics.value("kvxfer_leases_ended_total", outcome="aborted") == 1
    assert metrics.value("kvxfer_leases_ended_total", outcome="expired") == 1


CONSUMERS = ["d0", "d1", "d2"]


class LeaseMachine(RuleBasedStateMachine):
    """Model: which request holds each block. Every release must free exactly blocks the model
    says that request holds (so never a block twice), and the end leaves nothing held."""

    def __init__(self) -> None:
        super().__init__()
        self.table = LeaseTable(ttl_s=10)
        self.now = 0.0
        self.next_id = 0
        self.owner: dict[int, str] = {}  # block -> request id, per the model
        self.free_pool = list(range(40))
        self.num_freed = 0

    def _free(self, released) -> None:
        if released is None:
            return
        for block in released.blocks:
            assert self.owner.pop(block) == released.request_id  # KeyError: freed twice
        self.free_pool.extend(released.blocks)
        self.num_freed += len(released.blocks)

    @rule(n=st.integers(1, 4), consumers=st.sets(st.sampled_from(CONSUMERS), min_size=1))
    def acquire(self, n, consumers):
        if len(self.free_pool) < n:
            return
        blocks, self.free_pool = self.free_pool[:n], self.free_pool[n:]
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.table.acquire(rid, blocks, consumers, now=self.now)
        self.owner.update((b, rid) for b in blocks)

    @rule(rid=st.integers(0, 30), consumer=st.sampled_from(CONSUMERS))
    def confirm(self, rid, consumer):
        try:
            self._free(self.table.confirm(f"r{rid}", consumer, now=self.now))
        except LeaseError:
            pass

    @rule(rid=st.integers(0, 30), consumer=st.sampled_from(CONSUMERS))
    def renew(self, rid, consumer):
        try:
            self.table.renew(f"r{rid}", consumer, now=self.now)
        except LeaseError:
            pass

    @rule(rid=st.integers(0, 30))
    def abort(self, rid):
        try:
            self._free(self.table.abort(f"r{rid}"))
        except LeaseError:
            pass

    @rule(dt=st.floats(0, 6))
    def tick_and_expire(self, dt):
        self.now += dt
        for released in self.table.expire(self.now):
            self._free(released)

    @invariant()
    def table_agrees_with_model(self):
        assert self.table.num_blocks_held == len(self.owner)

    def teardown(self) -> None:
        # Once every lease is past its expiry, nothing is held: 0 leaked blocks.
        for released in self.table.expire(self.now + self.table.ttl_s):
            self._free(released)
        assert self.owner == {} and self.table.num_leases == 0
        assert self.table.num_blocks_held == 0


TestLeaseInterleavings = LeaseMachine.TestCase
