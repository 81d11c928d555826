"""The command bus inside a service: a worker that misses a command's deadline leaves the bus out
of step (its late reply would be taken for the next command's), so the bus reports itself dead
and the service exits to be restarted, instead of pairing replies and collectives wrongly."""

from __future__ import annotations

import multiprocessing.connection as mpc
import time

import msgspec
import pytest

from kvxfer.daemons.bus import Bus, serve_commands
from kvxfer.errors import PeerGoneError, TransferTimeout


class Sleep(msgspec.Struct, tag="sleep"):
    seconds: float


class Done(msgspec.Struct, tag="done"):
    slept: float


ENCODER = msgspec.msgpack.Encoder()


def sleeper(conn: mpc.Connection) -> None:
    def handle(command: Sleep) -> Done:
        time.sleep(command.seconds)
        return Done(command.seconds)

    serve_commands(conn, handle, msgspec.msgpack.Decoder(Sleep), ENCODER, lambda: False)


def test_a_worker_late_past_the_deadline_puts_the_bus_out_of_step():
    bus = Bus(ENCODER, msgspec.msgpack.Decoder(Done))
    bus.spawn(sleeper, lambda rank: (), range(1, 2))
    try:
        assert bus.call(Sleep(0.0), lambda: None, timeout_s=30.0)[1] == Done(0.0)
        assert bus.alive()
        with pytest.raises(TransferTimeout):
            bus.call(Sleep(3.0), lambda: None, timeout_s=0.5)
        assert not bus.alive() and "did not answer" in (bus.out_of_step or "")
    finally:
        bus.close()


def quitter(conn: mpc.Connection) -> None:
    conn.close()  # a rank that dies before its first reply


@pytest.mark.parametrize(("label", "named"), [(None, "rank 1"), (lambda rank: f"decode{rank - 1}", "decode0")])
def test_a_worker_that_exits_is_named_by_its_label(label, named):
    bus = Bus(ENCODER, msgspec.msgpack.Decoder(Done))
    bus.spawn(quitter, lambda rank: (), range(1, 2), **({} if label is None else {"label": label}))
    try:
        with pytest.raises(PeerGoneError, match=f"^{named} \\(pid"):
            bus.gather(timeout_s=30.0)
    finally:
        bus.close()
