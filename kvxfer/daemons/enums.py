"""The daemons' domain enums: what `kvxfer serve` and `kvxfer proxy` settings choose between.
A flag's accepted values are these enums' values."""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


class Mode(str, Enum):
    READ = "read"  # decode pulls from prefill's cache
    WRITE = "write"  # prefill pushes into blocks decode allocated first
    AUTO = "auto"  # the faster of the two, measured at handshake


class TransferPath(str, Enum):
    AUTO = "auto"  # the cost model's pick (calibrated against each producer at handshake)
    DIRECT = "direct"  # one NIXL descriptor per span, zero-copy
    STAGED = "staged"  # gather, one descriptor, scatter (a WRITE; needs staging slots on both sides)


class RetryPolicy(str, Enum):
    RETRY_ONCE = "retry-once"  # after a decode load failure, once more through a fresh prefill
    FAIL = "fail"


def values(enum: type[Enum]) -> tuple[str, ...]:
    """The values a flag naming one of `enum`'s members accepts, in declaration order."""
    return tuple(member.value for member in enum)
