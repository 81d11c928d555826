"""Pairing one local cache with one remote cache: spans of equal length, one to one.

Built once per peer (`pair`), then applied per request (`request_spans`). The span granularity
is chosen from the two layouts' strides: starting from one row (head_dim elements), a unit absorbs
every coordinate (tokens of a chunk, heads, K/V) that is contiguous on both sides. Chunks are
`gcd(local block_size, remote block_size)` tokens, so block-size conversion in either direction is
zero-copy: a chunk never straddles a block on either side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from kvxfer.errors import LayoutError, PlanError
from kvxfer.layouts import (
    CacheDesc,
    CacheRegion,
    Dim,
    check_block_ids,
    ids_per_kv,
    merge_contiguous,
    validate_desc,
)
from kvxfer.planning.tp import HeadRange


class Fallback(Enum):
    """What to do when the heads to move are not contiguous per chunk on both sides."""

    NONE = "none"  # refuse with a PlanError that says why
    FINE = "fine"  # accept many small zero-copy spans (per token, or per row)


@dataclass(frozen=True)
class PairPlan:
    """How rows of `local` pair with rows of `remote` for the global heads `heads`."""

    local: CacheRegion
    remote: CacheRegion
    heads: HeadRange
    chunk_tokens: int
    unit_bytes: int
    fuse_kv: bool  # K and V rows adjacent on both sides: one span carries both
    outer: tuple[Dim, ...]  # coordinates enumerated as separate spans, strides (local, remote)

    @property
    def spans_per_chunk(self) -> int:
        n = 1 if self.fuse_kv else self.local.desc.num_kv
        for dim in self.outer:
            n *= dim.extent
        return n

    def units_per_layer(self, num_tokens: int) -> int:
        """Units (spans of `unit_bytes`) of a `num_tokens` request in one layer: the descriptors
        a direct transfer posts per layer, the rows a staged one gathers."""
        return -(-num_tokens // self.chunk_tokens) * self.spans_per_chunk


# Fields that must agree for any pairing; each mismatch is reported with both values.
_MUST_MATCH = ("num_layers", "head_dim", "dtype", "total_heads", "has_v")
_FEW_IDS = 1024  # block ids a request checks as a Python list (`_few_valid_ids`); numpy above


def pair(
    local: CacheRegion,
    remote: CacheRegion,
    heads: HeadRange,
    *,
    fallback: Fallback = Fallback.NONE,
) -> PairPlan:
    """Pair two caches for `heads` (global head indices held by both), or raise PlanError."""
    ld, rd = local.desc, remote.desc
    for who, desc in (("local", ld), ("remote", rd)):
        try:
            validate_desc(desc, who=f"{who} {desc.layout}")
        except LayoutError as err:
            raise PlanError(str(err)) from None
    bad = [(f, getattr(ld, f), getattr(rd, f)) for f in _MUST_MATCH if getattr(ld, f) != getattr(rd, f)]
    if bad:
        raise PlanError("caches cannot be paired: " + "; ".join(f"{f} local={a!r} remote={b!r}" for f, a, b in bad))
    for who, desc in (("local", ld), ("remote", rd)):
        lo, hi = desc.heads
        if not lo <= heads.start < heads.stop <= hi:
            raise PlanError(f"head range {heads} outside {who} rank heads [{lo}, {hi})")
    chunk = math.gcd(ld.block_size, rd.block_size)
    dims = [
        Dim("head", heads.size, (ld.head_stride, rd.head_stride)),
        Dim("token", chunk, (ld.token_stride, rd.token_stride)),
    ]
    shared_pages = not (ld.separate_kv_pages or rd.separate_kv_pages)
    kv_dim = Dim("kv", ld.num_kv, (ld.kv_stride, rd.kv_stride))
    unit, outer = merge_contiguous([*dims, kv_dim] if shared_pages else dims, ld.row_bytes)
    fuse_kv = kv_dim.extent > 1 and shared_pages and kv_dim not in outer
    outer = [d for d in outer if d.name != "kv"]
    if any(d.name == "token" for d in outer) and fallback is Fallback.NONE:
        raise PlanError(
            f"{ld.layout} -> {rd.layout}: heads {heads} (of local [{ld.heads[0]}, {ld.heads[1]}), "
            f"remote [{rd.heads[0]}, {rd.heads[1]})) are not contiguous per block on both sides; "
            f"that needs one span of {unit} bytes per token. Pass fallback='fine' to accept "
            f"that, or use an HND layout on both sides"
        )
    return PairPlan(local, remote, heads, chunk, unit, fuse_kv, tuple(outer))


@dataclass(frozen=True)
class SpanPairs:
    """Descriptor lists for one peer and one request: row i of `local` pairs with row i of
    `remote`; both `(N, 3)` uint64 (address, length, device), lengths equal row by row."""

    local: np.ndarray
    remote: np.ndarray

    @property
    def num_bytes(self) -> int:
        return int(self.local[:, 1].sum())

    @property
    def num_descriptors(self) -> int:
        return int(self.local.shape[0])


def request_spans(
    plan: PairPlan,
    local_ids: np.ndarray,
    remote_ids: np.ndarray,
    num_tokens: int,
    *,
    coalesce: bool = True,
) -> SpanPairs:
    """Paired, coalesced spans moving the first `num_tokens` tokens of one request.

    Whole chunks move, so the tail of the last block may carry rows past `num_tokens`; both
    blocks belong to the request, so nothing outside it is touched. Spans are ordered layer,
    chunk, K/V, then any finer coordinate.
    """
    local_offsets, remote_offsets = request_layer_offsets(plan, local_ids, remote_ids, num_tokens)
    # Offsets inside a layer are the same for every layer, so runs are found once per request,
    # on one layer's units, not on all of them; runs never cross layers.
    if coalesce:
        local_offsets, remote_offsets, lengths = coalesce_pairs(
            local_offsets, remote_offsets, plan.unit_bytes
        )
    else:
        lengths = np.full(local_offsets.size, plan.unit_bytes, dtype=np.int64)
    return SpanPairs(
        _per_layer(plan.local, local_offsets, lengths),
        _per_layer(plan.remote, remote_offsets, lengths),
    )


def request_layer_offsets(
    plan: PairPlan, local_ids: np.ndarray, remote_ids: np.ndarray, num_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets of each `plan.unit_bytes` unit of one request inside one layer, on each side,
    paired by position and ordered (chunk, K/V, finer): the same in every layer. What a staged
    transfer gathers and scatters."""
    return layer_offsets(plan, 0, local_ids, num_tokens), layer_offsets(plan, 1, remote_ids, num_tokens)


def layer_offsets(plan: PairPlan, side: int, block_ids: np.ndarray, num_tokens: int) -> np.ndarray:
    """One side's half of `request_layer_offsets` (side 0: local, 1: remote): all a staged
    sender or receiver needs of its own cache."""
    if num_tokens <= 0:
        raise PlanError(f"num_tokens={num_tokens} must be positive")
    num_chunks = -(-num_tokens // plan.chunk_tokens)
    return _layer_offsets(plan, side, block_ids, num_tokens, num_chunks, ("local", "remote")[side])


def _per_layer(region: CacheRegion, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`(layers * len(offsets), 3)` spans: every layer's base plus the same offsets."""
    num_layers = region.layer_addrs.size
    out = np.empty((num_layers, offsets.size, 3), dtype=np.uint64)
    np.add(region.layer_addrs[:, None], offsets.astype(np.uint64)[None, :], out=out[:, :, 0])
    out[:, :, 1] = lengths
    out[:, :, 2] = region.device_id
    return out.reshape(-1, 3)


def _layer_offsets(
    plan: PairPlan, side: int, block_ids: np.ndarray, num_tokens: int, num_chunks: int, who: str
) -> np.ndarray:
    """Offset of every unit of the request inside one layer, ordered (chunk, kv, *outer)."""
    desc = (plan.local, plan.remote)[side].desc
    ids = request_block_ids(desc, block_ids, num_tokens, who=who)
    which, within = unit_terms(plan, side, num_chunks * plan.chunk_tokens, id_row_stride=ids.shape[1])
    return ids.reshape(-1)[which] * desc.block_stride + within


def unit_terms(plan: PairPlan, side: int, num_tokens: int, *, id_row_stride: int) -> tuple[np.ndarray, np.ndarray]:
    """`layer_offsets` split into what does not depend on the block ids: for every unit, which
    block id it lies in (an index into the side's `request_block_ids` flattened, rows
    `id_row_stride` apart) and its byte offset from that block's start. Ordered (chunk, kv,
    *outer), so a shorter request's units are a prefix: a GPU copier builds these once for its
    largest request and looks the ids up itself."""
    desc = (plan.local, plan.remote)[side].desc
    num_chunks = -(-num_tokens // plan.chunk_tokens)
    slot, offset = np.divmod(np.arange(num_chunks, dtype=np.int64) * plan.chunk_tokens, desc.block_size)
    num_kv = 1 if plan.fuse_kv else desc.num_kv
    kv = np.arange(num_kv, dtype=np.int64)
    head_offset = (plan.heads.start - desc.first_head) * desc.head_stride
    # [chunks, kv, *outer]; shared K/V pages keep one row of ids, separate pages one per K/V
    which = slot[:, None] + (kv * id_row_stride if desc.separate_kv_pages else 0 * kv)
    within = (offset * desc.token_stride + head_offset)[:, None] + kv * desc.kv_stride
    for dim in plan.outer:
        which = np.broadcast_to(which[..., None], (*which.shape, dim.extent))
        within = within[..., None] + np.arange(dim.extent, dtype=np.int64) * dim.strides[side]
    return which.reshape(-1), within.reshape(-1)


def request_block_ids(desc: CacheDesc, block_ids: np.ndarray, num_tokens: int, *, who: str) -> np.ndarray:
    """One request's block ids on one side as [rows, blocks] int64 (rows: 2 for separate K/V
    pages, else 1), refusing anything that is not exactly the request's own distinct, in-range
    blocks. What `unit_terms` indexes."""
    ids = _request_ids(desc, block_ids, num_tokens, who)
    return ids if desc.separate_kv_pages else ids[:1]


def _request_ids(desc: CacheDesc, block_ids: np.ndarray, num_tokens: int, who: str) -> np.ndarray:
    """[num_kv, blocks] ids of one request on one side, refusing anything that is not exactly
    the request's own distinct, in-range blocks."""
    try:
        return ids_per_kv(_checked_ids(desc, block_ids, num_tokens, who), desc)
    except LayoutError as err:
        raise PlanError(str(err)) from None


def _checked_ids(desc: CacheDesc, block_ids: np.ndarray, num_tokens: int, who: str) -> np.ndarray:
    """The request's ids as given (`[n]`, or `[2, n]` for separate K/V pages), checked: in
    range, distinct, as many blocks as `num_tokens` needs."""
    raw = np.asarray(block_ids)
    small = _few_valid_ids(raw, desc.num_blocks)
    try:
        raw = raw.astype(np.int64, copy=False) if small else check_block_ids(raw, desc, who=f"{who} {desc.layout}")
    except LayoutError as err:
        raise PlanError(str(err)) from None
    if raw.ndim != (2 if desc.separate_kv_pages else 1) or (desc.separate_kv_pages and raw.shape[0] != 2):
        _request_shape(raw, desc)
    needed = -(-num_tokens // desc.block_size)
    if raw.shape[-1] != needed:
        raise PlanError(
            f"{who} block ids: {num_tokens} tokens at block_size={desc.block_size} need {needed} "
            f"blocks, got {raw.shape[-1]}"
        )
    if raw.size > 1 and not small:
        flat = np.sort(raw, axis=None)
        repeats = flat[1:][flat[1:] == flat[:-1]]
        if repeats.size:
            raise PlanError(f"{who} block ids: block {int(repeats[0])} appears more than once")
    return raw


def _few_valid_ids(raw: np.ndarray, num_blocks: int) -> bool:
    """Whether `raw` is a few distinct integer ids in [0, num_blocks), checked as one Python
    list: for a request of a few blocks each numpy call costs more than the whole check (tens of
    microseconds once the process has slept). False sends them to numpy's checks, which name
    what is wrong."""
    if raw.dtype.kind not in "iu" or raw.size > _FEW_IDS:
        return False
    ids = raw.ravel().tolist()
    return not ids or (min(ids) >= 0 and max(ids) < num_blocks and len(set(ids)) == len(ids))


def _request_shape(raw: np.ndarray, desc: CacheDesc) -> None:
    """Raise the layout's own error for ids of the wrong shape."""
    try:
        ids_per_kv(raw, desc)
    except LayoutError as err:
        raise PlanError(str(err)) from None
    raise PlanError(f"{desc.layout}: block ids of shape {raw.shape}")


def descriptor_table(plan: PairPlan, side: int) -> np.ndarray:
    """Every unit of every block of one side's cache, `(N, 3)`, for NIXL's prepped lists.

    Ordered (layer, block, chunk in block, kv, *outer), which is what `request_indices`
    indexes. Built once per peer; requests then post int32 index arrays into it.
    """
    region = (plan.local, plan.remote)[side]
    desc = region.desc
    chunks_per_block = desc.block_size // plan.chunk_tokens
    num_kv = 1 if plan.fuse_kv else desc.num_kv
    head_offset = (plan.heads.start - desc.first_head) * desc.head_stride
    # offsets: [blocks, chunks_per_block, kv, *outer]
    offsets = (
        np.arange(desc.num_blocks, dtype=np.int64)[:, None, None] * desc.block_stride
        + (np.arange(chunks_per_block) * plan.chunk_tokens * desc.token_stride)[None, :, None]
        + (np.arange(num_kv) * desc.kv_stride)[None, None, :]
        + head_offset
    )
    for dim in plan.outer:
        offsets = offsets[..., None] + np.arange(dim.extent, dtype=np.int64) * dim.strides[side]
    offsets = offsets.reshape(-1)
    return _per_layer(region, offsets, np.full(offsets.size, plan.unit_bytes, dtype=np.int64))


def request_indices(
    plan: PairPlan, local_ids: np.ndarray, remote_ids: np.ndarray, num_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """int32 indices into `descriptor_table(plan, 0)` and `(plan, 1)`, paired row by row: the
    per-request work of the hot path (NIXL merges adjacent descriptors itself). A caller that
    posts many requests for one plan keeps a `RequestIndexer` instead."""
    return RequestIndexer(plan).indices(local_ids, remote_ids, num_tokens)


class RequestIndexer:
    """`request_indices` for one plan, with everything that does not depend on the request
    built once: a request then costs its ids' checks and a gather and a multiply-add per side,
    not the ~20 small array operations of building its index pattern anew."""

    def __init__(self, plan: PairPlan) -> None:
        self.plan = plan
        self._sides = (_SideIndexer(plan, 0, "local"), _SideIndexer(plan, 1, "remote"))

    def indices(
        self, local_ids: np.ndarray, remote_ids: np.ndarray, num_tokens: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if num_tokens <= 0:
            raise PlanError(f"num_tokens={num_tokens} must be positive")
        num_chunks = -(-num_tokens // self.plan.chunk_tokens)
        local, remote = self._sides
        return (local.indices(local_ids, num_tokens, num_chunks),
                remote.indices(remote_ids, num_tokens, num_chunks))


class _SideIndexer:
    """One side's indices: row (layer, block, chunk in block, kv, outer) of its table is
    `layer * per_layer + block * per_block + offset[chunk, kv, outer]`."""

    def __init__(self, plan: PairPlan, side: int, who: str) -> None:
        self.desc = desc = (plan.local, plan.remote)[side].desc
        self.who = who
        self.chunk_tokens = plan.chunk_tokens
        self.num_kv = 1 if plan.fuse_kv else desc.num_kv
        self.num_outer = math.prod(dim.extent for dim in plan.outer)
        self.chunks_per_block = desc.block_size // plan.chunk_tokens
        self.per_block = self.chunks_per_block * self.num_kv * self.num_outer
        per_layer = desc.num_blocks * self.per_block
        if per_layer * desc.num_layers > np.iinfo(np.int32).max:
            raise PlanError(
                f"{who} descriptor table has {per_layer * desc.num_layers} rows, more than int32 "
                f"indices reach; use request_spans"
            )
        self.layer_starts = np.arange(0, desc.num_layers * per_layer, per_layer, dtype=np.int32)[:, None]
        self._slot = np.zeros(0, dtype=np.int64)  # the request block of each chunk
        self._offset = np.zeros((0, self.num_kv, self.num_outer), dtype=np.int64)

    def indices(self, block_ids: np.ndarray, num_tokens: int, num_chunks: int) -> np.ndarray:
        ids = _checked_ids(self.desc, block_ids, num_tokens, self.who)
        if num_chunks > self._slot.size:
            self._grow(max(num_chunks, 2 * self._slot.size))
        slot = self._slot[:num_chunks]
        if self.desc.separate_kv_pages:  # [2, n]: K pages, V pages
            blocks = ids[: self.num_kv, slot].T[..., None]
        else:  # shared pages: a chunk's K and V rows are in one block
            blocks = ids[slot][:, None, None]
        rows = blocks * self.per_block + self._offset[:num_chunks]
        return np.add(self.layer_starts, rows.reshape(1, -1), dtype=np.int32).reshape(-1)

    def _grow(self, num_chunks: int) -> None:
        slot, chunk_in_block = np.divmod(np.arange(num_chunks) * self.chunk_tokens, self.desc.block_size)
        chunk_in_block //= self.chunk_tokens
        kv = np.arange(self.num_kv)
        offset = (chunk_in_block[:, None] * self.num_kv + kv) * self.num_outer
        self._slot = slot
        self._offset = offset[..., None] + np.arange(self.num_outer)


def coalesce_pairs(
    local: np.ndarray, remote: np.ndarray, unit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge runs of units that are contiguous on both sides into single spans."""
    if local.size == 0:
        return local, remote, np.zeros(0, dtype=np.int64)
    joins = (local[1:] == local[:-1] + unit) & (remote[1:] == remote[:-1] + unit)
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    lengths = np.diff(np.append(starts, local.size)) * unit
    return local[starts], remote[starts], lengths
