"""How long one transfer may take before it fails with TransferTimeout.

One type, with its defaults in one place, for the daemons (`--transfer-deadline-s`,
`--expected-gbps`), the vLLM connector (`transfer_deadline_s`, `expected_gbps`), the agents'
endpoint and the bench. Imports nothing but the error tree, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvxfer.errors import ConfigError


@dataclass(frozen=True)
class Deadline:
    """A transfer of N bytes may take `slack_s + N / (expected_gbps * 1e9)` seconds."""

    # Fixed part: posting, the notification round trip, a scheduler tick on a busy host.
    slack_s: float = 5.0
    # Pessimistic on purpose: NIXL VRAM->VRAM READs between two processes on one H200 ran at
    # 0.5-0.7 GB/s (measured 2026-12); a deadline too long delays an error, one too short fails a
    # transfer that would have finished.
    expected_gbps: float = 0.5

    def __post_init__(self) -> None:
        for name in ("slack_s", "expected_gbps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"Deadline.{name}={getattr(self, name)!r} must be positive")

    def seconds(self, num_bytes: int) -> float:
        """Seconds a transfer of `num_bytes` may take."""
        return self.slack_s + num_bytes / (self.expected_gbps * 1e9)


__all__ = ["Deadline"]
