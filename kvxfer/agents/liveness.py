"""Whether the producer ranks a consumer rank waits on for pushes still answer.

A push request is a NIXL notification: a producer that died or restarted never refuses it, and
NIXL may not report the send as failed (without UCX's peer-failure handling nothing does), so a
consumer rank would wait out the push's whole not-after window for nothing. Once a wait has
lasted `PROBE_AFTER_S` (a push normally ends in milliseconds), `PushWatch` pings each producer
rank over the side channel, one ping at a time per rank: no answer within the timeout, a lost
connection or another boot epoch ends the wait with a PeerGoneError naming the rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvxfer.agents import messages as m
from kvxfer.agents.sidechannel import ClientCache, PendingCall, Target
from kvxfer.errors import KvxferError, PeerGoneError

PROBE_AFTER_S = 0.5  # how long a wait for pushes runs before the producer ranks are asked
PROBE_EVERY_S = 1.0  # then, between one rank's answer and its next probe


@dataclass
class _Probe:
    target: Target
    next_at: float
    call: PendingCall | None = None


class PushWatch:
    """One wait's probes. A pending ping holds its side-channel client (shared with the
    heartbeat's renewals, which wait behind it within their own deadline), and a ping to a
    producer whose connection dropped blocks `check` up to the timeout: the wait fails then."""

    def __init__(self, clients: ClientCache, params: m.TransferParams, targets: dict[int, Target], *,
                 timeout_s: float, after_s: float = PROBE_AFTER_S) -> None:
        start = time.monotonic() + after_s
        self._clients = clients
        self._params = params
        self._probes = {rank: _Probe(target, start) for rank, target in targets.items()}
        self._timeout_s = timeout_s

    def check(self) -> None:
        """Between looks at the inbox: start the probes that are due, take the answers that came.
        Raises PeerGoneError for a rank that is gone or restarted."""
        now = time.monotonic()
        for rank, probe in self._probes.items():
            try:
                if probe.call is None and now >= probe.next_at:
                    probe.call = self._clients.call(probe.target, m.Ping(), timeout_s=self._timeout_s)
                reply = probe.call.poll() if probe.call is not None else None
            except KvxferError as err:
                raise PeerGoneError(f"producer {self._params.engine_id} rank {rank} at {probe.target.address} "
                                    f"stopped answering while its push was awaited ({err.kind}: {err}); the "
                                    f"request's KV is lost with it") from err
            if reply is not None:
                probe.call = None
                probe.next_at = time.monotonic() + PROBE_EVERY_S
                self._check_epoch(rank, probe.target, reply)

    def close(self) -> None:
        for probe in self._probes.values():
            if probe.call is not None:
                probe.call.close()
                probe.call = None

    def _check_epoch(self, rank: int, target: Target, reply: m.Message) -> None:
        if isinstance(reply, m.Pong) and (reply.engine_id, reply.boot_epoch) != (self._params.engine_id,
                                                                                  self._params.boot_epoch):
            raise PeerGoneError(gone(self._params, rank, target.address, reply.engine_id, reply.boot_epoch))


def gone(params: m.TransferParams, rank: int, address: str, engine_id: str, epoch: int) -> str:
    """Why a request's KV is lost: its producer rank at `address` restarted (or another took its
    place)."""
    return (f"prefill {params.engine_id} rank {rank} at epoch {params.boot_epoch} is gone: {address} is now "
            f"{engine_id} at epoch {epoch} (restarted; the request's KV was lost with it)")
