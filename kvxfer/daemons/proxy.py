"""`kvxfer proxy`: the OpenAI-compatible front door of a disaggregated deployment.

For each `/v1/completions` request it asks a prefill service for the prompt's KV (getting transfer
parameters back), then a decode service to load that KV and generate, relaying the answer (also as
a stream). It balances round-robin over several services of each kind, skips services that just
failed, and turns every failure into an HTTP error with a typed body instead of a hang or an empty
200: prefill down (503), decode load failure (502, or retried once through a fresh prefill when
the policy says so), deadline (504), bad request (400).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kvxfer.agents.messages import Binding
from kvxfer.daemons import api
from kvxfer.daemons.enums import RetryPolicy

log = logging.getLogger("kvxfer.proxy")

_COOLDOWN_S = 5.0  # a service that failed is skipped this long, unless every service failed
_IDENTITY_TTL_S = 5.0


class ProxyError(Exception):
    """A request the proxy must answer with an error; `kind` is the error body's type."""

    def __init__(self, kind: str, message: str, status: int):
        super().__init__(message)
        self.kind, self.status = kind, status


@dataclass
class Pool:
    """Round-robin over services of one kind, skipping recently failed ones."""

    name: str
    urls: list[str]
    _next: itertools.count = field(default_factory=itertools.count)
    _failed_at: dict[str, float] = field(default_factory=dict)

    def order(self) -> list[str]:
        """All urls, starting at the next in turn, healthy ones first."""
        start = next(self._next) % len(self.urls)
        turn = self.urls[start:] + self.urls[:start]
        now = time.monotonic()
        healthy = [u for u in turn if now - self._failed_at.get(u, -1e9) > _COOLDOWN_S]
        return healthy + [u for u in turn if u not in healthy]

    def mark_failed(self, url: str) -> None:
        self._failed_at[url] = time.monotonic()

    def mark_ok(self, url: str) -> None:
        self._failed_at.pop(url, None)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kvxfer_proxy_requests", "Completion requests by outcome",
                                ["outcome"], registry=self.registry)
        self.latency = Histogram("kvxfer_proxy_request_seconds", "End-to-end request latency",
                                 registry=self.registry)
        self.retries = Counter("kvxfer_proxy_retries", "Decode load failures retried through a "
                               "fresh prefill", registry=self.registry)


class Proxy:
    def __init__(self, *, prefill_urls: list[str], decode_urls: list[str], request_timeout_s: float,
                 retry_policy: RetryPolicy = RetryPolicy.RETRY_ONCE, client: httpx.AsyncClient | None = None):
        self.prefill = Pool("prefill", [u.rstrip("/") for u in prefill_urls])
        self.decode = Pool("decode", [u.rstrip("/") for u in decode_urls])
        self.timeout_s = request_timeout_s
        self.retry_policy = retry_policy
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=5.0))
        self.metrics = Metrics()
        self._identities: dict[str, tuple[float, Binding]] = {}

    async def consumer(self) -> tuple[str, Binding]:
        """The next decode service that answers, and the binding that lets it fetch KV."""
        errors = []
        for url in self.decode.order():
            cached = self._identities.get(url)
            if cached and time.monotonic() - cached[0] < _IDENTITY_TTL_S:
                return url, cached[1]
            try:
                reply = await self.client.get(f"{url}/v1/kvxfer/identity", timeout=5.0)
                info = reply.json()
                if reply.status_code != 200 or not info.get("engine_id"):
                    raise ValueError(f"HTTP {reply.status_code}")
            except (httpx.HTTPError, ValueError) as err:
                self.decode.mark_failed(url)
                errors.append(f"{url}: {type(err).__name__}: {err}")
                continue
            binding = Binding(consumer_key=info["public_key"]) if info.get("public_key") else \
                Binding(consumer_engine_id=info["engine_id"])
            self._identities[url] = (time.monotonic(), binding)
            return url, binding
        raise ProxyError("decode_unavailable", "no decode service answered: " + "; ".join(errors), 503)

    async def prefill_once(self, request: api.CompletionRequest, binding: Binding) -> api.CompletionResponse:
        body = msgspec.json.encode(msgspec.structs.replace(
            request, stream=False, kv_transfer_params=None, kvxfer_consumer=binding))
        errors = []
        for url in self.prefill.order():
            try:
                reply = await self.client.post(f"{url}/v1/completions", content=body,
                                               headers={"content-type": "application/json"})
            except httpx.HTTPError as err:
                self.prefill.mark_failed(url)
                errors.append(f"{url}: {type(err).__name__}: {err}")
                continue
            if reply.status_code == 200:
                self.prefill.mark_ok(url)
                return api.decode_response(reply.content)
            if reply.status_code < 500 and reply.status_code != 429:  # the request itself is bad
                raise ProxyError("invalid_request", _error_message(reply), reply.status_code)
            self.prefill.mark_failed(url)
            errors.append(f"{url}: HTTP {reply.status_code}: {_error_message(reply)}")
        raise ProxyError("prefill_unavailable", "no prefill service answered: " + "; ".join(errors), 503)

    async def decode_at(self, url: str, request: api.CompletionRequest, params) -> httpx.Response:
        """Open the decode request at `url`, streaming its body."""
        body = msgspec.json.encode(msgspec.structs.replace(request, kv_transfer_params=params))
        try:
            req = self.client.build_request("POST", f"{url}/v1/completions", content=body,
                                            headers={"content-type": "application/json"})
            reply = await self.client.send(req, stream=True)
        except httpx.HTTPError as err:
            self.decode.mark_failed(url)
            self._identities.pop(url, None)
            raise ProxyError("decode_unavailable", f"{url}: {type(err).__name__}: {err}", 503) from None
        if reply.status_code == 200:
            self.decode.mark_ok(url)
            return reply
        content = await reply.aread()
        await reply.aclose()
        message = f"{url}: {_error_message_bytes(content, reply.status_code)}"
        if reply.status_code < 500:
            raise ProxyError("invalid_request", message, reply.status_code)
        self._identities.pop(url, None)
        kind = _error_kind(content)
        if kind not in ("kv_load_failed", "not_ready"):
            self.decode.mark_failed(url)
        raise ProxyError("kv_load_failed" if kind == "kv_load_failed" else "decode_failed", message, 502)

    async def start(self, request: api.CompletionRequest) -> httpx.Response:
        """Prefill then decode; a failed decode is retried once through a fresh prefill (and
        possibly another decode service) when the policy says so."""
        attempts = 2 if self.retry_policy is RetryPolicy.RETRY_ONCE else 1
        for attempt in range(attempts):
            url, binding = await self.consumer()
            prefilled = await self.prefill_once(request, binding)
            if prefilled.kv_transfer_params is None:
                raise ProxyError("prefill_unavailable", "prefill answered without kv_transfer_params", 502)
            try:
                return await self.decode_at(url, request, prefilled.kv_transfer_params)
            except ProxyError as err:
                if err.kind not in _RETRYABLE or attempt == attempts - 1:
                    raise
                self.metrics.retries.inc()
                log.warning("decode failed (%s); retrying through a fresh prefill", err)
        raise ProxyError("internal", "no attempt was made", 500)


_RETRYABLE = ("kv_load_failed", "decode_unavailable", "decode_failed")


def _error_kind(content: bytes) -> str:
    try:
        return msgspec.json.decode(content, type=api.ErrorResponse).error.type
    except msgspec.MsgspecError:
        return ""


def _error_message_bytes(content: bytes, status: int) -> str:
    try:
        return msgspec.json.decode(content, type=api.ErrorResponse).error.message
    except msgspec.MsgspecError:
        return content[:300].decode(errors="replace") or f"HTTP {status}"


def _error_message(reply: httpx.Response) -> str:
    return _error_message_bytes(reply.content, reply.status_code)


def _error_response(kind: str, message: str, status: int) -> Response:
    return Response(api.error_json(kind, message, status), status_code=status, media_type="application/json")


def create_app(proxy: Proxy) -> FastAPI:
    app = FastAPI(title="kvxfer proxy")

    @app.get("/health")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/ready")
    async def ready() -> Response:
        """Ready when at least one prefill and one decode service report ready."""
        results = {}
        for pool in (proxy.prefill, proxy.decode):
            checks = await asyncio.gather(*(_is_ready(proxy.client, u) for u in pool.urls))
            results[pool.name] = sum(checks)
        ok = all(results.values())
        return Response(msgspec.json.encode({"ready": ok, **results}), status_code=200 if ok else 503,
                        media_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        started = time.monotonic()
        try:
            body = api.decode_request(await request.body())
        except msgspec.MsgspecError as err:
            proxy.metrics.requests.labels("invalid_request").inc()
            return _error_response("invalid_request", str(err), 400)
        try:
            reply = await asyncio.wait_for(proxy.start(body), timeout=proxy.timeout_s)
        except ProxyError as err:
            proxy.metrics.requests.labels(err.kind).inc()
            return _error_response(err.kind, str(err), err.status)
        except asyncio.TimeoutError:
            proxy.metrics.requests.labels("timeout").inc()
            return _error_response("timeout", f"no answer within {proxy.timeout_s:.0f} s", 504)
        if body.stream:
            return StreamingResponse(_relay(proxy, reply, started), media_type="text/event-stream")
        try:
            content = await asyncio.wait_for(reply.aread(), timeout=proxy.timeout_s)
        except (asyncio.TimeoutError, httpx.HTTPError) as err:
            proxy.metrics.requests.labels("decode_failed").inc()
            return _error_response("decode_failed", f"decode stopped answering: {err!r}", 502)
        finally:
            await reply.aclose()
        proxy.metrics.requests.labels("ok").inc()
        proxy.metrics.latency.observe(time.monotonic() - started)
        return Response(content, media_type="application/json")

    @app.on_event("shutdown")
    async def close_client() -> None:
        await proxy.client.aclose()

    return app


async def _relay(proxy: Proxy, reply: httpx.Response, started: float) -> AsyncIterator[bytes]:
    """Relay decode's event stream; a failure mid-stream ends it with an error event."""
    try:
        async for chunk in reply.aiter_raw():
            yield chunk
        proxy.metrics.requests.labels("ok").inc()
        proxy.metrics.latency.observe(time.monotonic() - started)
    except httpx.HTTPError as err:
        proxy.metrics.requests.labels("decode_failed").inc()
        yield api.sse(api.ErrorResponse(error=api.ErrorBody(
            type="decode_failed", message=f"decode stopped mid-stream: {err!r}", code=502)))
        yield b"data: [DONE]\n\n"
    finally:
        await reply.aclose()


async def _is_ready(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(f"{url}/ready", timeout=2.0)).status_code == 200
    except httpx.HTTPError:
        return False
