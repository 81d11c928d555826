"""The command bus inside one service: rank 0 drives ranks 1..N-1, one process each.

Rank 0 sends every rank the same command, runs it itself, and gathers the replies: engine steps
are collective (torch.distributed inside), so all ranks must enter them together. Commands and
replies are msgspec-encoded over `multiprocessing` pipes. A rank that dies or stops answering
ends the call with PeerGoneError / TransferTimeout instead of a hang.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from kvxfer.agents.pacing import IdlePacer
from kvxfer.errors import KvxferError, PeerGoneError, TransferTimeout, error_class

log = logging.getLogger(__name__)


class Failed(msgspec.Struct, tag="failed"):
    """A rank's command raised; `kind` is a KvxferError kind or "internal"."""

    kind: str
    message: str


class Bus:
    """Rank 0's ends of the pipes to ranks 1..N-1, with the worker processes."""

    def __init__(self, encoder: msgspec.msgpack.Encoder, decoder: msgspec.msgpack.Decoder) -> None:
        self._encoder = encoder
        self._decoder = decoder
        self._conns: list[mpc.Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        self._labels: list[str] = []  # how errors name each worker ("rank 1", ...)
        self._lock = threading.Lock()
        # Set when a worker missed a command's deadline: its late reply (and, for collective
        # commands, its collectives) would be taken for the next command's, so the bus is done.
        self.out_of_step: str | None = None

    def spawn(self, target: Callable[..., None], args_for_rank: Callable[[int], tuple], ranks: range, *,
              label: Callable[[int], str] = "rank {}".format) -> None:
        """One process per rank, `target(*args_for_rank(rank), conn)`; errors name it `label(rank)`."""
        ctx = mp.get_context("spawn")
        for rank in ranks:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=target, args=(*args_for_rank(rank), theirs), daemon=True,
                               name=f"kvxfer-rank{rank}")
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
            self._labels.append(label(rank))

    @property
    def num_workers(self) -> int:
        return len(self._conns)

    def alive(self) -> bool:
        return self.out_of_step is None and all(p.is_alive() for p in self._procs)

    def alive_each(self) -> list[bool]:
        return [p.is_alive() for p in self._procs]

    def pids(self) -> list[int]:
        return [p.pid or 0 for p in self._procs]

    def send_all(self, command: msgspec.Struct) -> None:
        if not self._conns:  # rank 0 alone (TP 1): nothing to encode
            return
        payload = self._encoder.encode(command)
        for who, conn in zip(self._labels, self._conns, strict=True):
            try:
                conn.send_bytes(payload)
            except (OSError, ValueError) as err:
                raise PeerGoneError(f"{who} is gone: {err}") from None

    def gather(self, timeout_s: float) -> list[Any]:
        """One reply per worker, in rank order; a Failed reply raises its error."""
        deadline = time.monotonic() + timeout_s
        replies = []
        for who, conn, proc in zip(self._labels, self._conns, self._procs, strict=True):
            replies.append(self._receive(who, conn, proc, deadline))
        for who, reply in zip(self._labels, replies, strict=True):
            if isinstance(reply, Failed):
                raise _error_of(reply, who)
        return replies

    def _receive(self, who: str, conn: mpc.Connection, proc: mp.process.BaseProcess, deadline: float) -> Any:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.out_of_step = f"{who} (pid {proc.pid}) did not answer a command in time"
                raise TransferTimeout(f"{who} did not answer in time")
            try:
                if conn.poll(min(left, 0.5)):
                    return self._decoder.decode(conn.recv_bytes())
            except (EOFError, OSError) as err:
                raise PeerGoneError(f"{who} (pid {proc.pid}) is gone: {err}") from None
            if not proc.is_alive():
                raise PeerGoneError(f"{who} (pid {proc.pid}) exited with code {proc.exitcode}")

    def call(self, command: msgspec.Struct, run_local: Callable[[], Any], *, timeout_s: float) -> list[Any]:
        """Send `command` to every worker, run it on rank 0, gather: replies in rank order."""
        with self._lock:
            self.send_all(command)
            try:
                local = run_local()
            finally:
                # Drain the workers' replies even when rank 0 failed, so the next call's replies
                # are not mistaken for this one's.
                replies = self.gather(timeout_s)
            return [local, *replies]

    def kill(self) -> None:
        """SIGKILL every worker still running (a service giving up on its ranks)."""
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()

    def close(self, timeout_s: float = 5.0) -> None:
        for conn in self._conns:
            conn.close()
        for proc in self._procs:
            proc.join(timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)


def _error_of(reply: Failed, who: str) -> KvxferError:
    return error_class(reply.kind)(f"{who}: {reply.message}")


def serve_commands(conn: mpc.Connection, handle: Callable[[Any], msgspec.Struct],
                   decoder: msgspec.msgpack.Decoder, encoder: msgspec.msgpack.Encoder,
                   idle: Callable[[], bool]) -> None:
    """A worker's loop: run each command, reply; call `idle` between commands (NIXL progress,
    notifications; True if it found work), soon after a command and less often while nothing
    happens. Returns when rank 0 closes the pipe."""
    pace = IdlePacer()
    while True:
        try:
            ready = conn.poll(pace.wait_s)
        except (EOFError, OSError):
            return
        if not ready:
            pace.after(idle())
            continue
        pace.reset()
        try:
            command = decoder.decode(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            reply = handle(command)
        except KvxferError as err:
            reply = Failed(kind=err.kind, message=str(err))
        except Exception as err:  # report, keep serving: rank 0 decides what a failure means
            log.exception("rank command %s failed", type(command).__name__)
            reply = Failed(kind="internal", message=f"{type(err).__name__}: {err}")
        try:
            conn.send_bytes(encoder.encode(reply))
        except (OSError, ValueError):
            return
        idle()  # at once: what the command left to do (a load's confirmations) waits for no poll
