"""Ready means warm: a decode service meets its producers before their first request.

Which producers: the side channels of `--producers` (known at start), and those the proxy names
(`POST /v1/kvxfer/producers`, when it sees a prefill service come up). A thread of their own
("kvxfer-producers") asks each who serves there (a Ping: engine id, boot epoch); an (engine,
epoch) not met yet is met on the engine thread, in line with loads (they share the consumer):
rank 0 handshakes (the producer's TP size), every decode rank prepares (`Prepare`: handshakes,
NIXL connections, descriptor lists; kvxfer.agents.prepare), and rank 0 calibrates where the cost
model will choose (`--mode` not read). One log line per (producer engine, boot epoch) with each
step's time. The thread asks again every WATCH_S, so a restarted producer is met again before its
first request rather than inside it.

`/ready` waits for the producers of `--producers`, saying which and why, up to
`--producers-wait-s` after the ranks started. One not met by then stops holding it: a warning
names it, and it is met in the background once it answers (a request it prefills before that
meets it itself, as without `--producers`). Waiting forever would make every decode service's
readiness depend on every prefill service: one prefill pod down, or pools started in the other
order, would take decode out of its Service for the producers that are up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import Counter, Gauge, Histogram

from kvxfer.agents import messages as m
from kvxfer.agents.consumer import Consumer
from kvxfer.agents.prepare import ProducerRef, discover, with_tp_size
from kvxfer.agents.sidechannel import ClientCache, ClientConfig, rank_address
from kvxfer.daemons import api
from kvxfer.daemons.commands import Prepare, Prepared
from kvxfer.daemons.decode_rank import REQUEST_TIMEOUT_S, DecodeRank
from kvxfer.daemons.runtime import HANDSHAKE_TIMEOUT_S
from kvxfer.daemons.service import COMMAND_SLACK_S
from kvxfer.errors import ConfigError, KvxferError, TransferError

if TYPE_CHECKING:
    from kvxfer.daemons.decode import DecodeService

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 1.0
WATCH_S = 5.0  # how often a met producer is asked whether it restarted
FIRST_RETRY_S = 0.1  # a producer that does not answer: retried after this, doubling...
MAX_RETRY_S = 5.0  # ...up to this
FORGET_S = 300.0  # a producer the proxy named that has not answered this long is dropped
MAX_PRODUCERS = 1024  # named through HTTP: bounded, each costs a Ping every WATCH_S


class ProducerNotice(msgspec.Struct, frozen=True, kw_only=True):
    """`POST /v1/kvxfer/producers`: a producer the proxy routes to (its rank 0 side channel),
    and who it was then (when known: a producer met at that epoch costs nothing)."""

    side_channel: m.ShortStr
    engine_id: m.ShortStr = ""
    boot_epoch: m.U64 = 0


@dataclass
class _Producer:
    side_channel: str
    configured: bool  # --producers: /ready waits for it; else the proxy named it
    met: tuple[str, int] | None = None  # (engine id, boot epoch) prepared
    refused: tuple[str, int] | None = None  # (engine id, boot epoch) whose meeting was refused (incompatible...)
    error: str = "not asked yet"
    retry_s: float = 0.0
    due: float = 0.0  # monotonic time of the next ask
    answered: float = 0.0  # monotonic time of the last answer (or of being named)


class ProducerMetrics:
    def __init__(self, registry) -> None:
        r = registry
        self.met = Gauge("kvxfer_producers_met", "Producers met at their current boot epoch (handshaken, "
                         "connected, descriptor lists prepared)", registry=r)
        self.unmet = Gauge("kvxfer_producers_unmet", "Producers named (--producers or the proxy) not met: "
                           "not answering, or their meeting failed", registry=r)
        self.meetings = Counter("kvxfer_producer_meetings", "Producers met ahead of their requests, one per "
                                "(engine, boot epoch)", registry=r)
        self.failures = Counter("kvxfer_producer_meeting_failures", "Failed attempts to meet a producer, by "
                                "kind", ["kind"], registry=r)
        self.seconds = Histogram("kvxfer_producer_meeting_seconds", "Time of each step of meeting a producer "
                                 "(slowest rank)", ["step"], registry=r,
                                 buckets=(1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0))


class Producers:
    """The producers a decode service meets ahead of their requests (see the module's doc)."""

    def __init__(self, service: DecodeService, *, calibrate: Callable[[m.TransferParams], object] | None) -> None:
        self.service = service
        self.calibrate = calibrate  # rank 0's cached calibration; None: the cost model never asks
        self.wait_s = service.config.producers_wait_s
        self.metrics = ProducerMetrics(service.metrics.transfer.registry)
        self._lock = threading.Lock()
        self._producers = {a: _Producer(a, configured=True) for a in service.config.producers}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._waits_until = float("inf")  # set at start
        self._reported = False
        self._thread: threading.Thread | None = None
        self._clients: ClientCache | None = None  # Pings of its own: no request's call queues behind one

    def start(self) -> None:
        """Begin meeting producers (once the ranks are up)."""
        rank = self.service.runtime
        if not isinstance(rank, DecodeRank):
            raise ConfigError("meeting producers needs a started decode service")
        self._clients = ClientCache(ClientConfig(keys=rank.keys, insecure=self.service.config.insecure_plaintext))
        self._waits_until = time.monotonic() + self.wait_s
        self._thread = threading.Thread(target=self._run, args=(rank.consumer, self._clients), name="kvxfer-producers",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(PING_TIMEOUT_S + 1.0)
        if self._clients is not None:
            self._clients.close()

    def waiting_for(self) -> str:
        """Why /ready is not 200 yet on this account ("" when it need not wait)."""
        if time.monotonic() > self._waits_until:
            return ""
        with self._lock:
            missing = [p for p in self._producers.values() if p.configured and p.met is None]
        if not missing:
            return ""
        return "meeting producers (--producers): " + "; ".join(f"{p.side_channel}: {p.error}" for p in missing)

    def name(self, notice: ProducerNotice) -> bool:
        """A producer the proxy routes to; True if it is met already at that epoch. Raises
        ConfigError for a malformed address or when too many are named."""
        try:
            rank_address(notice.side_channel, 0)
        except ConfigError:
            raise ConfigError(f"side_channel={notice.side_channel!r}: expected tcp://HOST:PORT") from None
        with self._lock:
            known = self._producers.get(notice.side_channel)
            if known is not None and known.met == (notice.engine_id, notice.boot_epoch):
                return True
            if known is None:
                if len(self._producers) >= MAX_PRODUCERS:
                    raise ConfigError(f"{MAX_PRODUCERS} producers named already")
                self._producers[notice.side_channel] = _Producer(notice.side_channel, configured=False,
                                                                 answered=time.monotonic())
            else:
                known.due = 0.0
        self._wake.set()
        return False

    # ---- the thread ---------------------------------------------------------------------------

    def _run(self, consumer: Consumer, clients: ClientCache) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                due = [p for p in self._producers.values() if p.due <= now]
            if due:
                try:
                    self._visit(due, consumer, clients)
                except Exception:  # the thread outlives a bug in one visit, and ends with the service
                    if self._stop.is_set():
                        return
                    log.exception("meeting producers failed; asking again in %.0f s", MAX_RETRY_S)
                    self._later(due, MAX_RETRY_S)
            self._after_visit()
            with self._lock:
                next_due = min((p.due for p in self._producers.values()), default=now + WATCH_S)
            if not self._reported:
                next_due = min(next_due, self._waits_until)
            self._wake.wait(max(0.0, next_due - time.monotonic()))
            self._wake.clear()

    def _later(self, producers: list[_Producer], delay_s: float) -> None:
        with self._lock:
            for p in producers:
                p.due = time.monotonic() + delay_s

    def _visit(self, due: list[_Producer], consumer: Consumer, clients: ClientCache) -> None:
        refs = discover(clients, [p.side_channel for p in due], timeout_s=PING_TIMEOUT_S)
        for producer, ref in zip(due, refs, strict=True):
            if isinstance(ref, KvxferError):
                self._failed(producer, ref)
                continue
            with self._lock:
                producer.answered = time.monotonic()
            if ref.key not in (producer.met, producer.refused):
                try:
                    self._meet(producer, ref, consumer)
                except TransferError as err:  # lost on the way: asked again
                    self._failed(producer, err)
                    continue
                except KvxferError as err:  # refused (incompatible, unauthorised...): until its next epoch
                    self._failed(producer, err, refused=ref)
                    continue
            with self._lock:
                producer.retry_s, producer.due = 0.0, time.monotonic() + WATCH_S

    def _meet(self, producer: _Producer, ref: ProducerRef, consumer: Consumer) -> None:
        started = time.perf_counter()
        met = self.service.executor.submit(self._meet_on_engine_thread, ref, consumer).result()
        ref, first_s, replies, calibration_s = met
        ranks = [r for r in replies if isinstance(r, Prepared)]
        steps = {"handshake": first_s + max(r.handshake_s for r in ranks), "calibration": calibration_s,
                 "connect": max(r.connect_s for r in ranks), "prepare": max(r.prepare_s for r in ranks),
                 "copiers": max(r.copiers_s for r in ranks)}
        for step, seconds in steps.items():
            self.metrics.seconds.labels(step=step).observe(seconds)
        self.metrics.meetings.inc()
        with self._lock:
            producer.met, producer.error = ref.key, "met"
        log.info("met producer %s (epoch %d, TP %d) at %s before its requests: handshake %.1f ms, calibration "
                 "%s, connect %.1f ms, prepare %.1f ms, staging copiers %s (slowest of %d decode ranks); %.1f ms in all",
                 ref.engine_id, ref.boot_epoch, ref.tp_size, ref.side_channel, steps["handshake"] * 1e3,
                 f"{calibration_s * 1e3:.1f} ms" if self.calibrate else "none (--mode read)",
                 steps["connect"] * 1e3, steps["prepare"] * 1e3,
                 f"{steps['copiers'] * 1e3:.1f} ms" if steps["copiers"] else "none (torch indexing or no staging)",
                 len(ranks), (time.perf_counter() - started) * 1e3)

    def _meet_on_engine_thread(self, ref: ProducerRef, consumer: Consumer) -> tuple[ProducerRef, float, list, float]:
        started = time.perf_counter()
        ref = with_tp_size(consumer, ref)
        first_s = time.perf_counter() - started
        # Each rank's bound: a handshake per producer rank, a Ping round and a probe READ per rank.
        bound_s = (HANDSHAKE_TIMEOUT_S + REQUEST_TIMEOUT_S) * (ref.tp_size + 1) + COMMAND_SLACK_S
        replies = self.service.call(Prepare(ref.params()), timeout_s=bound_s)
        calibrated = time.perf_counter()
        if self.calibrate is not None:
            self.calibrate(ref.params())
        return ref, first_s, replies, time.perf_counter() - calibrated

    def _failed(self, producer: _Producer, err: KvxferError, *, refused: ProducerRef | None = None) -> None:
        self.metrics.failures.labels(kind=err.kind).inc()
        first = producer.retry_s == 0.0
        with self._lock:
            producer.error = f"{err.kind}: {err}"
            producer.retry_s = min(max(FIRST_RETRY_S, producer.retry_s * 2), MAX_RETRY_S)
            producer.due = time.monotonic() + producer.retry_s
            producer.refused = refused.key if refused is not None else producer.refused
        if refused is not None:
            log.warning("cannot meet producer %s (epoch %d) at %s: %s; asked again once it restarts",
                        refused.engine_id, refused.boot_epoch, producer.side_channel, producer.error)
        else:
            (log.info if first else log.debug)("producer %s not met (%s); asking again with backoff",
                                               producer.side_channel, producer.error)

    def _after_visit(self) -> None:
        """Metrics, forgetting producers the proxy named that went away, and the one report of
        how the wait for `--producers` ended."""
        now = time.monotonic()
        with self._lock:
            gone = [a for a, p in self._producers.items() if not p.configured and now - p.answered > FORGET_S]
            for address in gone:
                del self._producers[address]
            producers = list(self._producers.values())
        for address in gone:
            log.info("forgot producer %s: named by the proxy, not answering for %.0f s", address, FORGET_S)
        self.metrics.met.set(sum(p.met is not None for p in producers))
        self.metrics.unmet.set(sum(p.met is None for p in producers))
        if not self._reported:
            self._report([p for p in producers if p.configured and p.met is None], now)

    def _report(self, missing: list[_Producer], now: float) -> None:
        if not missing and self.service.config.producers:
            self._reported = True
            log.info("ready: every --producers service met, %.1f s after the ranks started",
                     now - self._waits_until + self.wait_s)
        elif now > self._waits_until:
            self._reported = True
            for p in missing:
                log.warning("ready without producer %s: not met within --producers-wait-s=%g (%s); its requests "
                            "meet it themselves until it is met here", p.side_channel, self.wait_s, p.error)


def add_routes(app: FastAPI, producers: Producers) -> None:
    """`POST /v1/kvxfer/producers` (a `ProducerNotice`): 200 when met at that epoch already,
    202 when it will be met in the background, 400 naming a bad field."""
    decoder = msgspec.json.Decoder(ProducerNotice)

    @app.post("/v1/kvxfer/producers")
    async def named(request: Request) -> Response:
        try:
            met = producers.name(decoder.decode(await request.body()))
        except (msgspec.MsgspecError, ConfigError) as err:
            return Response(api.error_json(api.INVALID_REQUEST, str(err), param="side_channel"), status_code=400,
                            media_type="application/json")
        return Response(msgspec.json.encode({"met": met}), status_code=200 if met else 202,
                        media_type="application/json")
