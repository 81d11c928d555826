"""TP mapping, table-driven: which prefill rank sends which heads to which decode rank."""

import pytest

from kvxfer.errors import PlanError
from kvxfer.planning import Direction, heads_of_rank, map_tp


def triples(mapping):
    return [(a.prefill_rank, a.decode_rank, (a.heads.start, a.heads.stop)) for a in mapping.assignments]


@pytest.mark.parametrize(
    "heads,ptp,dtp,direction,ratio,expected",
    [
        (8, 1, 1, Direction.SAME, 1, [(0, 0, (0, 8))]),
        (8, 1, 2, Direction.FAN_OUT, 2, [(0, 0, (0, 4)), (0, 1, (4, 8))]),
        (8, 2, 1, Direction.FAN_IN, 2, [(0, 0, (0, 4)), (1, 0, (4, 8))]),
        (8, 4, 2, Direction.FAN_IN, 2, [(0, 0, (0, 2)), (1, 0, (2, 4)), (2, 1, (4, 6)), (3, 1, (6, 8))]),
        # prefill replicates (P_TP > heads) and P_TP > D_TP: each head read once, spread over replicas
        (2, 4, 2, Direction.FAN_IN, 2, [(0, 0, (0, 1)), (3, 1, (1, 2))]),
        (2, 4, 1, Direction.FAN_IN, 4, [(0, 0, (0, 1)), (2, 0, (1, 2))]),
        # both sides replicate: decode replicas of a head take prefill replicas in turn
        (2, 4, 4, Direction.SAME, 1, [(0, 0, (0, 1)), (1, 1, (0, 1)), (2, 2, (1, 2)), (3, 3, (1, 2))]),
        (2, 2, 4, Direction.FAN_OUT, 2, [(0, 0, (0, 1)), (0, 1, (0, 1)), (1, 2, (1, 2)), (1, 3, (1, 2))]),
        # MLA: one latent replicated everywhere
        (1, 2, 4, Direction.FAN_OUT, 2, [(0, 0, (0, 1)), (1, 1, (0, 1)), (0, 2, (0, 1)), (1, 3, (0, 1))]),
    ],
)
def test_mapping_table(heads, ptp, dtp, direction, ratio, expected):
    m = map_tp(heads, ptp, dtp)
    assert m.direction is direction
    assert m.ratio == ratio
    assert triples(m) == expected


@pytest.mark.parametrize("heads", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("ptp", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("dtp", [1, 2, 4, 8, 16, 32])
def test_every_decode_head_exactly_once_from_a_holder(heads, ptp, dtp):
    m = map_tp(heads, ptp, dtp)
    for d in range(dtp):
        want = heads_of_rank(heads, dtp, d)
        got = sorted(h for a in m.sources_of(d) for h in range(a.heads.start, a.heads.stop))
        assert got == list(range(want.start, want.stop))
        for a in m.sources_of(d):
            held = heads_of_rank(heads, ptp, a.prefill_rank)
            assert held.start <= a.heads.start and a.heads.stop <= held.stop


def test_reads_spread_over_prefill_replicas():
    m = map_tp(2, 8, 8)  # 4 replicas per head on each side
    assert sorted(a.prefill_rank for a in m.assignments) == list(range(8))


@pytest.mark.parametrize(
    "heads,ptp,dtp,message",
    [
        (8, 3, 1, "prefill_tp=3 neither divides nor is a multiple of num_kv_heads=8"),
        (8, 2, 6, "decode_tp=6 neither divides nor is a multiple of num_kv_heads=8"),
        (0, 1, 1, "num_kv_heads=0 must be positive"),
        (8, 0, 1, "prefill_tp=0 must be positive"),
    ],
)
def test_invalid_tp_names_field_and_values(heads, ptp, dtp, message):
    with pytest.raises(PlanError, match=message):
        map_tp(heads, ptp, dtp)
