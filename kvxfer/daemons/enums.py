"""The daemons' setting enums: what `kvxfer serve` and `kvxfer proxy` settings choose between.
A flag's accepted values are these enums' values.

Concepts that also travel between ranks have one enum, in `agents.messages` (`Role`, `Mode`) or
`planning.cost` (`Path`). A setting that offers one more choice (`auto`: decided per request)
has its own `...Choice` enum, next to what decides it (`ModeChoice` and `TransferPathChoice`
in `agents.transfer_choice`, shared with the vLLM connector; re-exported here).
"""

from __future__ import annotations

from enum import Enum

from kvxfer.agents.transfer_choice import ModeChoice, TransferPathChoice


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


class RetryPolicy(str, Enum):
    RETRY_ONCE = "retry-once"  # after a decode load failure, once more through a fresh prefill
    FAIL = "fail"


def values(enum: type[Enum]) -> tuple[str, ...]:
    """The values a flag naming one of `enum`'s members accepts, in declaration order."""
    return tuple(member.value for member in enum)


__all__ = ["Device", "ModeChoice", "RetryPolicy", "TransferPathChoice", "values"]
