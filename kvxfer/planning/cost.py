"""The cost model that picks how a request moves: direct (zero-copy, one NIXL descriptor per
span) or staged (gather into a contiguous buffer, one descriptor, scatter on the other side), and
READ or WRITE in "auto" mode.

Pure arithmetic over numbers calibrated on the actual fabric (`FabricCosts`, measured at start-up
or handshake by the agents layer). On one GPU node descriptors dominate (about 6 us each against
a copy of ~1 TB/s), so staging wins by orders of magnitude; on a CPU-only machine the copy is the
bottleneck and the extra gather and scatter make staging lose. The choice and its inputs are
returned together so callers can log and export them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    seconds: float


@dataclass(frozen=True)
class Choice:
    """The cheapest way to move one request, with every candidate's estimate."""

    best: Estimate
    candidates: tuple[Estimate, ...]
    num_bytes: int
    direct_descriptors: int

    def describe(self) -> str:
        parts = ", ".join(f"{c.path.value}/{'write' if c.write else 'read'} {c.seconds * 1e3:.3f} ms"
                          for c in self.candidates)
        return (f"{self.best.path.value} {'write' if self.best.write else 'read'} for "
                f"{self.num_bytes} bytes in {self.direct_descriptors} direct descriptors ({parts})")


def estimate(costs: FabricCosts, *, num_bytes: int, descriptors: int, path: Path, write: bool,
             staged_descriptors: int = 1) -> Estimate:
    bandwidth = costs.write_bytes_per_s if write else costs.read_bytes_per_s
    wire = num_bytes / bandwidth
    if path is Path.DIRECT:
        seconds = costs.per_transfer_s + descriptors * costs.per_descriptor_s + wire
    else:  # gather on the sender, one (or a few) descriptors, scatter on the receiver
        seconds = (costs.per_transfer_s + staged_descriptors * costs.per_descriptor_s + wire
                   + 2 * num_bytes / costs.copy_bytes_per_s)
    return Estimate(path, write, seconds)


def choose(costs: FabricCosts, *, num_bytes: int, descriptors: int,
           paths: tuple[Path, ...] = (Path.DIRECT, Path.STAGED),
           writes: tuple[bool, ...] = (False, True),
           allowed: tuple[tuple[Path, bool], ...] | None = None) -> Choice:
    """The cheapest (path, direction) among those allowed: every (path, write) of `paths` x
    `writes`, or exactly the pairs in `allowed` (say, no staged READ)."""
    if num_bytes < 0 or descriptors < 0:
        raise ConfigError(f"choose: num_bytes={num_bytes} and descriptors={descriptors} must not be negative")
    pairs = allowed if allowed is not None else tuple((p, w) for p in paths for w in writes)
    if not pairs:
        raise ConfigError("choose: no path or no direction allowed")
    candidates = tuple(estimate(costs, num_bytes=num_bytes, descriptors=descriptors, path=p, write=w)
                       for p, w in pairs)
    best = min(candidates, key=lambda e: e.seconds)
    return Choice(best, candidates, num_bytes, descriptors)
