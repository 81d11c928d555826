"""Is a peer compatible? Compare two handshakes field by field and report every difference.

`check_compatible(local, remote, peer=...)` raises `IncompatiblePeerError` listing each
mismatching field with both values, e.g. `caches[0].head_dim: local=128 remote=64`. Fields that
describe the remote alone (its TP rank holds the wrong heads, its cache description is not
self-consistent) are reported as `remote.<field>` with the expected value as "local".

Checked: protocol version, model fingerprint, roles (one prefill, one decode), TP sizes and ranks
(valid for the model's KV heads and mappable with `planning.map_tp`), number of caches, and per
cache: a valid description, the fields that must agree (layers, head_dim, dtype, total KV heads,
K/V vs latent), heads held consistent with the rank, one address per layer, and that the two
layouts pair for the heads these two ranks exchange (`planning.pair`). Modes: at least one
transfer mode both sides offer.
"""

from __future__ import annotations

import numpy as np

from kvxfer.agents.messages import (
    EngineInfo,
    HandshakeReply,
    HandshakeRequest,
    Mode,
    RegionInfo,
    Role,
)
from kvxfer.errors import IncompatiblePeerError, LayoutError, PlanError
from kvxfer.layouts import CacheRegion, validate_desc
from kvxfer.planning import Fallback, HeadRange, heads_of_rank, map_tp, pair

Handshake = HandshakeRequest | HandshakeReply
Mismatch = tuple[str, object, object]

_DESC_MUST_MATCH = ("num_layers", "head_dim", "dtype", "total_heads", "has_v")


def check_compatible(local: Handshake, remote: Handshake, *, peer: str, fallback: Fallback = Fallback.FINE) -> None:
    """Raise IncompatiblePeerError listing every field on which `remote` cannot pair with `local`."""
    mismatches = find_mismatches(local, remote, fallback=fallback)
    if mismatches:
        raise IncompatiblePeerError(peer, mismatches)


def find_mismatches(local: Handshake, remote: Handshake, *, fallback: Fallback = Fallback.FINE) -> list[Mismatch]:
    """Every (field, local value, remote value) that makes the pair unusable; empty if none."""
    lo, re_ = local.engine, remote.engine
    found: list[Mismatch] = []
    if local.protocol_version != remote.protocol_version:
        found.append(("protocol_version", local.protocol_version, remote.protocol_version))
        return found  # nothing else can be trusted to mean the same thing
    if lo.model_fingerprint != re_.model_fingerprint:
        found.append(("model_fingerprint", lo.model_fingerprint, re_.model_fingerprint))
    if lo.role == re_.role:
        found.append(("role", lo.role.value, re_.role.value))
    if not set(lo.modes) & set(re_.modes):
        found.append(("modes", sorted(x.value for x in lo.modes), sorted(x.value for x in re_.modes)))
    found += _rank_mismatches(re_, who="remote")
    if len(lo.regions) != len(re_.regions):
        found.append(("num_caches", len(lo.regions), len(re_.regions)))
    for i, (lr, rr) in enumerate(zip(lo.regions, re_.regions, strict=False)):
        found += _cache_mismatches(i, lr, rr, lo, re_, fallback)
    return found


def _rank_mismatches(engine: EngineInfo, *, who: str) -> list[Mismatch]:
    if engine.tp_rank >= engine.tp_size:
        return [(f"{who}.tp_rank", f"< tp_size={engine.tp_size}", engine.tp_rank)]
    return []


def _cache_mismatches(
    i: int, lr: RegionInfo, rr: RegionInfo, lo: EngineInfo, re_: EngineInfo, fallback: Fallback
) -> list[Mismatch]:
    name = f"caches[{i}]"
    invalid = _desc_problem(rr)
    if invalid:
        return [(f"remote.{name}", "a valid cache description", invalid)]
    found: list[Mismatch] = [
        (f"{name}.{f}", getattr(lr.desc, f), getattr(rr.desc, f))
        for f in _DESC_MUST_MATCH
        if getattr(lr.desc, f) != getattr(rr.desc, f)
    ]
    found += _heads_mismatches(name, rr, re_)
    if found:
        return found
    return _tp_and_pairing(name, lr, rr, lo, re_, fallback)


def _desc_problem(region: RegionInfo) -> str:
    try:
        validate_desc(region.desc, who="remote")
    except LayoutError as err:
        return str(err)
    if len(region.layer_addrs) != region.desc.num_layers:
        return f"{len(region.layer_addrs)} layer address(es) for num_layers={region.desc.num_layers}"
    return ""


def _heads_mismatches(name: str, region: RegionInfo, engine: EngineInfo) -> list[Mismatch]:
    """The remote's cache must hold exactly the heads its TP rank owns."""
    desc = region.desc
    if desc.total_heads % engine.tp_size and engine.tp_size % desc.total_heads:
        return [("remote.tp_size", f"divides or is a multiple of total_heads={desc.total_heads}", engine.tp_size)]
    if engine.tp_rank >= engine.tp_size:
        return []  # reported once by _rank_mismatches
    expected = heads_of_rank(desc.total_heads, engine.tp_size, engine.tp_rank)
    held = HeadRange(desc.first_head, desc.first_head + desc.num_heads)
    if held != expected:
        return [(f"remote.{name}.heads", f"{expected} for tp_rank {engine.tp_rank} of {engine.tp_size}", str(held))]
    return []


def _tp_and_pairing(
    name: str, lr: RegionInfo, rr: RegionInfo, lo: EngineInfo, re_: EngineInfo, fallback: Fallback
) -> list[Mismatch]:
    prefill, decode = (lo, re_) if lo.role is Role.PREFILL else (re_, lo)
    heads = lr.desc.total_heads
    try:
        mapping = map_tp(heads, prefill.tp_size, decode.tp_size)
    except PlanError as err:
        return [("tp_size", lo.tp_size, f"{re_.tp_size} ({err})")]
    if lo.tp_rank >= lo.tp_size:
        return [("local.tp_rank", f"< tp_size={lo.tp_size}", lo.tp_rank)]
    exchanged = [
        a.heads for a in mapping.sources_of(decode.tp_rank) if a.prefill_rank == prefill.tp_rank
    ]
    problems: list[Mismatch] = []
    for head_range in exchanged:  # empty: these two ranks exchange nothing, nothing to pair
        try:
            pair(_region(lr), _region(rr), head_range, fallback=fallback)
        except (PlanError, LayoutError) as err:
            problems.append((f"{name}.layout", lr.desc.layout, f"{rr.desc.layout} ({err})"))
    return problems[:1]


def _region(info: RegionInfo) -> CacheRegion:
    return CacheRegion(info.desc, np.asarray(info.layer_addrs, dtype=np.uint64), info.device_id)


def common_modes(local: EngineInfo, remote: EngineInfo) -> tuple[Mode, ...]:
    """Transfer modes both sides offer, READ first."""
    shared = set(local.modes) & set(remote.modes)
    return tuple(mode for mode in (Mode.READ, Mode.WRITE) if mode in shared)
