"""The daemons' setting enums: what `kvxfer serve` and `kvxfer proxy` settings choose between.
A flag's accepted values are these enums' values.

Concepts that also travel between ranks have one enum, in `agents.messages` (`Role`, `Mode`) or
`planning.cost` (`Path`). A setting that offers one more choice (`auto`: decided per request)
has its own `...Choice` enum here (`ModeChoice.fixed` says which `Mode` it fixes).
"""

from __future__ import annotations

from enum import Enum

from kvxfer.agents.messages import Mode


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


class ModeChoice(str, Enum):
    """`--mode`: a transfer `Mode`, or AUTO."""

    READ = "read"  # decode pulls from prefill's cache
    WRITE = "write"  # prefill pushes into blocks decode allocated first
    AUTO = "auto"  # the faster of the two, measured at handshake

    def fixed(self) -> Mode | None:
        """The mode this choice fixes; None for AUTO (the per-request pick)."""
        return {ModeChoice.READ: Mode.READ, ModeChoice.WRITE: Mode.WRITE}.get(self)


class TransferPathChoice(str, Enum):
    """`--transfer-path`: a transfer `Path`, or AUTO."""

    AUTO = "auto"  # the cost model's pick (calibrated against each producer at handshake)
    DIRECT = "direct"  # one NIXL descriptor per span, zero-copy
    STAGED = "staged"  # gather, one descriptor, scatter (a WRITE; needs staging slots on both sides)


class RetryPolicy(str, Enum):
    RETRY_ONCE = "retry-once"  # after a decode load failure, once more through a fresh prefill
    FAIL = "fail"


def values(enum: type[Enum]) -> tuple[str, ...]:
    """The values a flag naming one of `enum`'s members accepts, in declaration order."""
    return tuple(member.value for member in enum)
