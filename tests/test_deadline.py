"""kvxfer.deadline: a transfer's deadline is its slack plus its bytes at the expected bandwidth."""

import pytest

from kvxfer.deadline import Deadline
from kvxfer.errors import ConfigError


@pytest.mark.parametrize(("deadline", "num_bytes", "seconds"), [
    (Deadline(2.0, 1.0), 0, 2.0),
    (Deadline(1.0, 1.0), 2_000_000_000, 3.0),
    (Deadline(2.0, 40.0), 80 * 10**9, 4.0),
    (Deadline(), 1 << 30, 5.0 + (1 << 30) / 0.5e9),
])  # fmt: skip
def test_seconds(deadline, num_bytes, seconds):
    assert deadline.seconds(num_bytes) == pytest.approx(seconds)


@pytest.mark.parametrize(("slack_s", "gbps", "message"), [
    (5.0, 0.0, "Deadline.expected_gbps=0.0 must be positive"),
    (0.0, 1.0, "Deadline.slack_s=0.0 must be positive"),
    (5.0, -1.0, "Deadline.expected_gbps=-1.0"),
])  # fmt: skip
def test_a_deadline_that_cannot_pass_is_refused(slack_s, gbps, message):
    with pytest.raises(ConfigError, match=message):
        Deadline(slack_s, gbps)

