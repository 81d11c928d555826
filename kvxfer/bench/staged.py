"""Staged transfers in `kvxfer bench`, as the daemons run them (`agents.staged_transfer` through
the production `Endpoint`):

1. each decode rank builds its sources' parts and reserves a slot of its staging pool for all of
   them (`Endpoint.staged_parts`, `Endpoint.reserve`), as the consumer does before it sends its
   push requests (`PushAsk`);
2. each prefill rank gathers each of its parts into a slot of its own pool and WRITEs it with one
   descriptor to the offset that decode rank reserved (`Endpoint.stage_write`, `post_staged`:
   the producer's push);
3. each decode rank scatters once every source's notification arrived (`Reservation.scatter`)
   and frees its slot.

Step 1 is a command of its own (the offsets travel back through the coordinator, where the
daemons send them in a `PushAsk`), so its seconds are added to the window of steps 2-3.
"""

from __future__ import annotations

import time

import numpy as np

from kvxfer.agents.endpoint import Endpoint, Leg
from kvxfer.agents.staged_transfer import Reservation
from kvxfer.errors import ConfigError
from kvxfer.planning import TPMapping

# What a staged run reports, in order: the receivers' parts built and slots reserved (ms it
# took), every sender's WRITEs complete, the last notification seen at a receiver, the last
# receiver's scatter finished.
PHASES = ("reserved", "written", "notified", "scattered")


def reserve(endpoint: Endpoint, legs: list[Leg], local_ids: np.ndarray, num_tokens: int) -> tuple[Reservation, float]:
    """A decode rank's slot for every source's part (`legs` in `sources_of` order), and the
    seconds building the parts and reserving took."""
    started = time.perf_counter()
    parts = endpoint.staged_parts(legs, local_ids, num_tokens)
    if parts is None:
        raise ConfigError("bench staged: staging is off on this rank or on a peer")
    reservation = endpoint.reserve(parts)
    if reservation is None:
        raise ConfigError(f"bench staged: the request's {sum(parts.sizes)} bytes do not fit a staging slot")
    return reservation, time.perf_counter() - started


def send(endpoint: Endpoint, mapping: TPMapping, rank: int, legs: dict[int, Leg], offsets: dict[int, list[int]],
         local_ids: np.ndarray, num_tokens: int, *, notif: bytes) -> int:
    """A prefill rank's pushes, as the producer makes them (`Producer._push_staged`): for each
    decode rank it feeds (`legs`, by decode rank), each of that rank's sources that is us, into its
    reserved offset; every gather enqueued first, each WRITE posted once its gather ended, then
    all waited for. Returns the bytes."""
    parts = []
    try:
        for decode_rank, leg in legs.items():
            sources = mapping.sources_of(decode_rank)
            for source, offset in zip(sources, offsets[decode_rank], strict=True):
                if source.prefill_rank == rank:
                    part = Leg(leg.peer, source.heads, leg.remote_ids)
                    parts.append((part, endpoint.stage_write(part, local_ids, num_tokens, offset)))
    except BaseException:
        for _, staged in parts:
            endpoint.unstage(staged)
        raise
    posted = []
    try:
        while parts:
            part, staged = parts.pop(0)
            posted.append(endpoint.post_staged(staged, part, notif=notif))
    finally:  # a refused post: the parts not posted give their slots back, the posted ones end
        for _, staged in parts:
            endpoint.unstage(staged)
        num_bytes = sum(endpoint.finish(p).num_bytes for p in posted)
    return num_bytes


def receive(endpoint: Endpoint, reservation: Reservation, num_sources: int) -> int:
    """Wait for every source's notification, scatter, free the slot. Returns when the last
    notification arrived (monotonic ns)."""
    try:
        endpoint.agent.wait_notifs(num_sources, timeout_s=endpoint.deadline.seconds(sum(reservation.parts.sizes)))
        notified = time.monotonic_ns()
        reservation.scatter()
    finally:
        if endpoint.staging is not None and endpoint.staging.pool is not None:
            endpoint.staging.pool.release(reservation.slot)
    return notified
