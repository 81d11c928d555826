"""Handshake compatibility: table-driven, every mismatching field reported with both values."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import pytest

from kvxfer.agents import messages as m
from kvxfer.agents.compat import check_compatible, common_modes, find_mismatches
from kvxfer.errors import IncompatiblePeerError
from kvxfer.layouts import CacheDesc, describe
from kvxfer.planning import Fallback


@dataclass(frozen=True)
class Side:
    role: str
    tp: int = 1
    rank: int = 0
    layout: str = "flashinfer-hnd"
    heads: int = 8
    head_dim: int = 16
    dtype: str = "float16"
    layers: int = 2
    block_size: int = 16
    fingerprint: str = "llama-tiny"
    version: int = m.PROTOCOL_VERSION
    modes: tuple[m.Mode, ...] = (m.Mode.READ, m.Mode.WRITE)
    held: tuple[int, int] | None = None  # override the heads this rank's cache holds
    num_caches: int = 1
    desc_patch: dict[str, int] = field(default_factory=dict)
    num_addrs: int | None = None

    def handshake(self) -> m.HandshakeRequest:
        return m.HandshakeRequest(protocol_version=self.version, engine=self.engine())

    def engine(self) -> m.EngineInfo:
        region = m.RegionInfo(desc=self.desc(), layer_addrs=[i << 30 for i in range(self.num_addrs or self.layers)])
        return m.EngineInfo(
            engine_id=f"{self.role}-0",
            boot_epoch=1,
            role=m.Role(self.role),
            tp_size=self.tp,
            tp_rank=self.rank,
            model_fingerprint=self.fingerprint,
            agent_name="agent",
            agent_metadata=b"",
            regions=[region] * self.num_caches,
            modes=self.modes,
        )

    def desc(self) -> CacheDesc:
        lo, hi = self.held or self._heads()
        desc = describe(
            self.layout,
            num_layers=self.layers,
            num_blocks=8,
            block_size=self.block_size,
            num_heads=hi - lo,
            head_dim=self.head_dim,
            dtype=self.dtype,
            first_head=lo,
            total_heads=self.heads,
        )
        return msgspec.structs.replace(desc, **self.desc_patch)

    def _heads(self) -> tuple[int, int]:
        if self.layout == "mla":
            return 0, 1
        if self.tp <= self.heads:
            per = self.heads // self.tp
            return self.rank * per, (self.rank + 1) * per
        head = self.rank // (self.tp // self.heads)
        return head, head + 1


COMPATIBLE = [
    ("same tp", Side("decode"), Side("prefill")),
    ("decode tp2 rank1 <- prefill tp1", Side("decode", tp=2, rank=1), Side("prefill")),
    ("decode tp1 <- prefill tp2 rank1", Side("decode"), Side("prefill", tp=2, rank=1)),
    ("2 kv heads, prefill tp4 replicates", Side("decode", tp=2, rank=1, heads=2), Side("prefill", tp=4, rank=3, heads=2)),
    ("ranks that exchange nothing", Side("decode", tp=2, rank=0), Side("prefill", tp=2, rank=1)),
    ("block 16 <- 32", Side("decode", block_size=16), Side("prefill", block_size=32)),
    ("block 32 <- 16", Side("decode", block_size=32), Side("prefill", block_size=16)),
    ("hnd <- nhd, same tp", Side("decode"), Side("prefill", layout="flashinfer-nhd")),
    ("mla both sides", Side("decode", layout="mla", heads=1), Side("prefill", layout="mla", heads=1, tp=2, rank=1)),
    ("prefill is local", Side("prefill", tp=2, rank=0), Side("decode")),
]


@pytest.mark.parametrize("local, remote", [c[1:] for c in COMPATIBLE], ids=[c[0] for c in COMPATIBLE])
def test_compatible_pairs_pass(local: Side, remote: Side) -> None:
    check_compatible(local.handshake(), remote.handshake(), peer="p")


INCOMPATIBLE = [
    ("protocol version alone", Side("decode"), Side("prefill", version=m.PROTOCOL_VERSION + 1, head_dim=64),
     {"protocol_version": (m.PROTOCOL_VERSION, m.PROTOCOL_VERSION + 1)}),
    ("fingerprint", Side("decode"), Side("prefill", fingerprint="mistral"), {"model_fingerprint": ("llama-tiny", "mistral")}),
    ("same role", Side("decode"), Side("decode"), {"role": ("decode", "decode")}),
    ("head_dim", Side("decode"), Side("prefill", head_dim=32), {"caches[0].head_dim": (16, 32)}),
    ("dtype", Side("decode"), Side("prefill", dtype="bfloat16"), {"caches[0].dtype": ("float16", "bfloat16")}),
    ("num_layers", Side("decode"), Side("prefill", layers=3), {"caches[0].num_layers": (2, 3)}),
    ("total kv heads", Side("decode"), Side("prefill", heads=4), {"caches[0].total_heads": (8, 4)}),
    ("latent vs k/v", Side("decode", layout="mla", heads=1), Side("prefill", heads=1),
     {"caches[0].has_v": (False, True)}),
    ("no common mode", Side("decode", modes=(m.Mode.WRITE,)), Side("prefill", modes=(m.Mode.READ,)),
     {"modes": (["write"], ["read"])}),
    ("num caches", Side("decode"), Side("prefill", num_caches=2), {"num_caches": (1, 2)}),
]


def _by_field(mismatches: list[tuple[str, object, object]]) -> dict[str, tuple[object, object]]:
    return {name: (ours, theirs) for name, ours, theirs in mismatches}


@pytest.mark.parametrize(
    "local, remote, expected", [c[1:] for c in INCOMPATIBLE], ids=[c[0] for c in INCOMPATIBLE]
)
def test_each_mismatch_is_reported_with_both_values(local: Side, remote: Side, expected: dict[str, tuple[object, object]]) -> None:
    with pytest.raises(IncompatiblePeerError) as info:
        check_compatible(local.handshake(), remote.handshake(), peer="prefill-0")
    assert _by_field(info.value.mismatches) == expected
    for name, (ours, theirs) in expected.items():
        assert f"{name}: local={ours!r} remote={theirs!r}" in str(info.value)


def test_every_mismatching_field_is_listed_at_once() -> None:
    remote = Side("decode", fingerprint="other", head_dim=32, dtype="bfloat16", layers=3, heads=4, modes=(m.Mode.WRITE,))
    local = Side("decode", modes=(m.Mode.READ,))
    with pytest.raises(IncompatiblePeerError) as info:
        check_compatible(local.handshake(), remote.handshake(), peer="p")
    assert set(_by_field(info.value.mismatches)) == {
        "model_fingerprint",
        "role",
        "modes",
        "caches[0].head_dim",
        "caches[0].dtype",
        "caches[0].num_layers",
        "caches[0].total_heads",
    }
    assert "(7 field(s))" in str(info.value)


REMOTE_SELF_INCONSISTENT = [
    ("rank outside tp", Side("prefill", tp=2, rank=2, held=(0, 4)), "remote.tp_rank"),
    ("heads not those of its rank", Side("prefill", tp=2, rank=1, held=(0, 4)), "remote.caches[0].heads"),
    ("tp that does not divide heads", Side("prefill", tp=3, held=(0, 8)), "remote.tp_size"),
    ("strides past layer_bytes", Side("prefill", desc_patch={"layer_bytes": 64}), "remote.caches[0]"),
    ("one address per layer", Side("prefill", num_addrs=1), "remote.caches[0]"),
]


@pytest.mark.parametrize("remote, field_name", [c[1:] for c in REMOTE_SELF_INCONSISTENT], ids=[c[0] for c in REMOTE_SELF_INCONSISTENT])
def test_a_remote_that_contradicts_itself_is_refused(remote: Side, field_name: str) -> None:
    found = _by_field(find_mismatches(Side("decode").handshake(), remote.handshake()))
    assert field_name in found


def test_local_tp_that_cannot_map_is_reported() -> None:
    found = _by_field(find_mismatches(Side("decode", tp=3, rank=0, held=(0, 2)).handshake(),
                                      Side("prefill", tp=1).handshake()))
    assert set(found) == {"tp_size"}
    assert found["tp_size"][0] == 3


def test_layouts_that_only_pair_with_a_fine_fallback_are_refused_without_it() -> None:
    local, remote = Side("decode", tp=2).handshake(), Side("prefill", layout="flashinfer-nhd").handshake()
    assert find_mismatches(local, remote, fallback=Fallback.FINE) == []
    found = _by_field(find_mismatches(local, remote, fallback=Fallback.NONE))
    assert set(found) == {"caches[0].layout"}
    assert found["caches[0].layout"][0] == "flashinfer-hnd"
    assert "not contiguous" in str(found["caches[0].layout"][1])


def test_common_modes_read_first() -> None:
    a = Side("decode", modes=(m.Mode.WRITE, m.Mode.READ)).engine()
    b = Side("prefill", modes=(m.Mode.READ, m.Mode.WRITE)).engine()
    assert common_modes(a, b) == (m.Mode.READ, m.Mode.WRITE)
