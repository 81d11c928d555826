"""The cost model that picks how a request moves: direct (zero-copy, one NIXL descriptor per
span) or staged (gather into a contiguous buffer, one descriptor, scatter on the other side), and
READ or WRITE in "auto" mode.

Pure arithmetic over numbers calibrated on the actual fabric (`FabricCosts`, measured at start-up
or handshake by the agents layer). On one GPU node descriptors dominate (about 6 us each against
a copy of ~1 TB/s), so staging wins by orders of magnitude; on a CPU-only machine the copy is the
bottleneck and the extra gather and scatter make staging lose. The choice and its inputs are
returned together so callers can log and export them. What the probes cannot see (each path's
per-request host work) is learnt from the requests themselves (`Excess`).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import Enum

from kvxfer.errors import ConfigError


class Path(Enum):
    DIRECT = "direct"
    STAGED = "staged"


@dataclass(frozen=True)
class FabricCosts:
    """What one transfer costs on this fabric, by direction (seconds and bytes per second)."""

    per_transfer_s: float  # posting one transfer and learning it completed
    per_descriptor_s: float  # each descriptor NIXL cannot merge
    read_bytes_per_s: float  # bulk bandwidth of a READ with few descriptors
    write_bytes_per_s: float  # bulk bandwidth of a WRITE with few descriptors
    copy_bytes_per_s: float  # a local gather or scatter (device copy, or memcpy on CPU)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ConfigError(f"FabricCosts.{name}={value} must be positive")


@dataclass(frozen=True)
class Estimate:
    path: Path
    write: bool
    seconds: float  # what the choice compares: the model's figure plus `excess_s`
    excess_s: float = 0.0  # what this path's recent requests took beyond the model (`Excess`)

    @property
    def modeled_s(self) -> float:
        return self.seconds - self.excess_s


@dataclass
class Excess:
    """What requests took beyond the model's estimate, per (path, direction): the per-request
    host work calibration's probes do not see (a staged copy's id upload, kernel launch and
    event waits on both sides; a direct transfer's descriptor indexing), which on one GPU can
    outweigh the descriptors staging saves. The median of a path's latest `window` requests is
    added to its estimate, so a path the model favours but that runs slower gives way after one
    request. A path not seen yet is estimated by the model alone, which is optimistic (every
    request's excess also holds what all paths share: the engine's command, the decode ranks'
    checks): it is tried once, then compared by what it took. A path not taken for
    `forget_after` requests is forgotten so, and tried once again: what made it slow may have
    passed. The first request observed is not evidence (`first_is_warmup`): after a producer was
    met it also pays the first use of every step on its path (on the H200 3.6-12 ms, against
    1.5-7 ms for the next ones), and would keep its path from being chosen again. Excess is
    kept in seconds, whatever a request's size: it stands for fixed per-request work, and a
    bandwidth the probes misjudged shows in it only for requests of the sizes that ran lately."""

    window: int = 8
    forget_after: int = 256
    first_is_warmup: bool = True
    _seen: dict[tuple[Path, bool], deque[float]] = field(default_factory=dict, init=False, repr=False)
    _last: dict[tuple[Path, bool], int] = field(default_factory=dict, init=False, repr=False)
    _count: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.window < 1 or self.forget_after < 1:
            raise ConfigError(f"Excess: window={self.window} and forget_after={self.forget_after} must be positive")

    def observe(self, path: Path, write: bool, *, modeled_s: float, seconds: float) -> None:
        """One request moved on (`path`, `write`) in `seconds`, where the model said `modeled_s`."""
        self._count += 1
        if self._count == 1 and self.first_is_warmup:
            return
        for stale in [k for k in self._last if self._forgotten(k)]:
            del self._seen[stale], self._last[stale]
        key = (path, write)
        self._seen.setdefault(key, deque(maxlen=self.window)).append(seconds - modeled_s)
        self._last[key] = self._count

    def of(self, path: Path, write: bool) -> float:
        """The excess to add to (`path`, `write`)'s estimate (0 when none was seen lately)."""
        key = (path, write)
        seen = self._seen.get(key)
        return 0.0 if not seen or self._forgotten(key) else statistics.median(seen)

    def _forgotten(self, key: tuple[Path, bool]) -> bool:
        return self._count - self._last[key] >= self.forget_after


@dataclass(frozen=True)
class Choice:
    """The cheapest way to move one request, with every candidate's estimate."""

    best: Estimate
    candidates: tuple[Estimate, ...]
    num_bytes: int
    direct_descriptors: int

    def describe(self) -> str:
        parts = ", ".join(f"{c.path.value}/{'write' if c.write else 'read'} {c.seconds * 1e3:.3f} ms"
                          + (f" ({c.excess_s * 1e3:+.3f} observed)" if c.excess_s else "")
                          for c in self.candidates)
        return (f"{self.best.path.value} {'write' if self.best.write else 'read'} for "
                f"{self.num_bytes} bytes in {self.direct_descriptors} direct descriptors ({parts})")


def estimate(costs: FabricCosts, *, num_bytes: int, descriptors: int, path: Path, write: bool,
             staged_descriptors: int = 1) -> Estimate:
    bandwidth = costs.write_bytes_per_s if write else costs.read_bytes_per_s
    wire = num_bytes / bandwidth
    if path is Path.DIRECT:
        seconds = costs.per_transfer_s + descriptors * costs.per_descriptor_s + wire
    else:  # gather on the sender, one (or a few) descriptors, scatter on the receiver; each copy
        # is issued and waited for as a transfer is (its fixed cost), then moves every byte
        seconds = (3 * costs.per_transfer_s + staged_descriptors * costs.per_descriptor_s + wire
                   + 2 * num_bytes / costs.copy_bytes_per_s)
    return Estimate(path, write, seconds)


def choose(costs: FabricCosts, *, num_bytes: int, descriptors: int,
           paths: tuple[Path, ...] = (Path.DIRECT, Path.STAGED),
           writes: tuple[bool, ...] = (False, True),
           allowed: tuple[tuple[Path, bool], ...] | None = None,
           excess: Excess | None = None) -> Choice:
    """The cheapest (path, direction) among those allowed: every (path, write) of `paths` x
    `writes`, or exactly the pairs in `allowed` (say, no staged READ); with `excess`, each
    estimate plus what its path's recent requests took beyond the model."""
    if num_bytes < 0 or descriptors < 0:
        raise ConfigError(f"choose: num_bytes={num_bytes} and descriptors={descriptors} must not be negative")
    pairs = allowed if allowed is not None else tuple((p, w) for p in paths for w in writes)
    if not pairs:
        raise ConfigError("choose: no path or no direction allowed")
    candidates = tuple(_with_excess(estimate(costs, num_bytes=num_bytes, descriptors=descriptors, path=p, write=w),
                                    excess) for p, w in pairs)
    best = min(candidates, key=lambda e: e.seconds)
    return Choice(best, candidates, num_bytes, descriptors)


def _with_excess(modeled: Estimate, excess: Excess | None) -> Estimate:
    extra = excess.of(modeled.path, modeled.write) if excess is not None else 0.0
    if not extra:
        return modeled
    seconds = max(modeled.seconds + extra, 0.0)
    return Estimate(modeled.path, modeled.write, seconds, seconds - modeled.seconds)
