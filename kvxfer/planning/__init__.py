"""Transfer planning: TP mapping, pairing of caches, per-request descriptor lists. Pure numpy."""

from kvxfer.planning.pairing import (
    Fallback,
    PairPlan,
    RequestIndexer,
    SpanPairs,
    coalesce_pairs,
    descriptor_table,
    layer_offsets,
    pair,
    request_block_ids,
    request_indices,
    request_layer_offsets,
    request_spans,
    unit_terms,
)
from kvxfer.planning.tp import Assignment, Direction, HeadRange, TPMapping, heads_of_rank, map_tp

__all__ = [
    "Assignment",
    "Direction",
    "Fallback",
    "HeadRange",
    "PairPlan",
    "SpanPairs",
    "TPMapping",
    "coalesce_pairs",
    "descriptor_table",
    "RequestIndexer",
    "request_indices",
    "layer_offsets",
    "request_block_ids",
    "unit_terms",
    "request_layer_offsets",
    "heads_of_rank",
    "map_tp",
    "pair",
    "request_spans",
]
