"""`kvxfer proxy`: the OpenAI-compatible front door of a disaggregated deployment.

For each `/v1/completions` or `/v1/chat/completions` request it asks a prefill server for the
prompt's KV (getting transfer parameters back), then a decode server to load that KV and
generate, relaying the answer (also as a stream). The servers are kvxfer services or vLLM servers
with KvxferConnector (`backends.py`). It balances round-robin over several servers of each pool,
puts servers that just failed or fail their health check last, and turns every failure into an
OpenAI-shaped error instead of a hang or an empty 200: prefill down (503), decode load failure
(502, or retried once through a fresh prefill when the policy says so), deadline (504), bad
request (400 naming the field, the backend's own 4xx relayed as it is).

It also introduces kvxfer's services to each other, so that a pair meets before its first
request (kvxfer.daemons.warm): every decode server hears of each prefill service (its rank 0 side
channel, engine id and boot epoch) once per boot epoch, when a health check finds it newly ready
(from its `/v1/kvxfer/identity`) or its transfer parameters name one not seen before, and a decode
server that turns ready hears of every prefill service known. Off the requests' path: the
introductions are tasks of their own, and a failed one is only logged. Then it rehearses each
pair of ready servers with one short request (kvxfer.daemons.rehearsal), and `/ready` waits for
those rehearsals: a pair's first-time costs are not a client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from kvxfer.daemons import api, chat
from kvxfer.daemons.auth import NO_KEYS, ApiKeys, require_api_keys
from kvxfer.daemons.backends import BackendKind, Pool, ProxyError, decode_body, make_backend
from kvxfer.daemons.enums import RetryPolicy
from kvxfer.daemons.proxy_metrics import ProxyMetrics
from kvxfer.daemons.rehearsal import MAX_TOKENS, PROMPT, Pair, Rehearsals

log = logging.getLogger("kvxfer.proxy")

HEALTH_INTERVAL_S = 2.0
JSON = "application/json"
_RETRYABLE = ("kv_load_failed", "decode_unavailable", "decode_failed")
# The endpoints the proxy fronts, and the validation each body gets before it goes anywhere.
ENDPOINTS = {"/v1/completions": api.decode_request, "/v1/chat/completions": chat.decode_request}


class Proxy:
    def __init__(self, *, prefill_urls: list[str], decode_urls: list[str], request_timeout_s: float,
                 retry_policy: RetryPolicy = RetryPolicy.RETRY_ONCE, backend: BackendKind = BackendKind.KVXFER,
                 backend_api_key: str | None = None, client: httpx.AsyncClient | None = None,
                 rehearse: bool = True):
        self.prefill = Pool("prefill", [u.rstrip("/") for u in prefill_urls])
        self.decode = Pool("decode", [u.rstrip("/") for u in decode_urls])
        self.timeout_s = request_timeout_s
        self.retry_policy = retry_policy
        self.backend = make_backend(backend)
        self.headers = {"authorization": f"Bearer {backend_api_key}"} if backend_api_key else {}
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=5.0))
        self.metrics = ProxyMetrics(backend.value)
        self._producers: dict[str, dict[str, Any]] = {}  # engine id -> its latest ProducerNotice (JSON)
        self._ready: dict[str, bool] = {}  # url -> its last health check
        self._tasks: set[asyncio.Task] = set()
        self.rehearsals = Rehearsals(self._rehearse, enabled=rehearse, timeout_s=request_timeout_s)

    # ---- one request ----------------------------------------------------------------------------

    async def start(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """Prefill then decode; a failed decode is retried once through a fresh prefill (and
        possibly another decode server) when the policy says so."""
        attempts = 2 if self.retry_policy is RetryPolicy.RETRY_ONCE else 1
        for attempt in range(attempts):
            url, binding = await self.consumer()
            started = time.monotonic()
            prefilled = await self.prefill_once(path, self.backend.prefill_body(body, binding))
            self.metrics.prefill.labels(self.metrics.backend).observe(time.monotonic() - started)
            params = prefilled.get("kv_transfer_params")
            if not params:
                raise ProxyError("prefill_unavailable", "prefill answered without kv_transfer_params", 502)
            self.saw_producer(params)
            try:
                return await self.decode_at(url, path, decode_body(body, params))
            except ProxyError as err:
                if err.kind not in _RETRYABLE or attempt == attempts - 1:
                    raise
                self.metrics.retries.labels(self.metrics.backend).inc()
                log.warning("decode failed (%s); retrying through a fresh prefill", err)
        raise ProxyError("internal", "no attempt was made", 500)

    async def consumer(self) -> tuple[str, Any]:
        """The next decode server that answers, and what binds the prefill's KV to it."""
        errors = []
        for url in self.decode.order():
            try:
                return url, await self.backend.bind(self.client, url, self.headers)
            except (httpx.HTTPError, ValueError) as err:
                self._failed(self.decode, url, "decode_unavailable")
                errors.append(f"{url}: {type(err).__name__}: {err}")
        raise ProxyError("decode_unavailable", "no decode server answered: " + "; ".join(errors), 503)

    async def prefill_once(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The first prefill server's answer, in turn; a server that fails is passed over."""
        errors = []
        for url in self.prefill.order():
            try:
                return await self.prefill_at(url, path, body)
            except ProxyError as err:
                if err.status < 500:
                    raise  # the request itself is bad: another server would refuse it too
                errors.append(str(err))
        raise ProxyError("prefill_unavailable", "no prefill server answered: " + "; ".join(errors), 503)

    async def prefill_at(self, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Prefill server `url`'s answer; raises ProxyError (`prefill_unavailable`, `prefill_failed`,
        or the server's 4xx)."""
        try:
            reply = await self.client.post(f"{url}{path}", json=body, headers=self.headers)
        except httpx.HTTPError as err:
            self._failed(self.prefill, url, "prefill_unavailable")
            raise ProxyError("prefill_unavailable", f"{url}: {type(err).__name__}: {err}", 503) from None
        if reply.status_code == 200:
            self.prefill.mark_ok(url)
            return reply.json()
        if reply.status_code < 500 and reply.status_code != 429:  # the request itself is bad
            raise _client_error(reply.status_code, reply.content)
        self._failed(self.prefill, url, "prefill_failed")
        raise ProxyError("prefill_failed", f"{url}: HTTP {reply.status_code}: "
                         f"{_message(reply.content, reply.status_code)}", 503)

    async def decode_at(self, url: str, path: str, body: dict[str, Any]) -> httpx.Response:
        """Open the decode request at `url`, streaming its body."""
        try:
            request = self.client.build_request("POST", f"{url}{path}", json=body, headers=self.headers)
            reply = await self.client.send(request, stream=True)
        except httpx.HTTPError as err:
            self._failed(self.decode, url, "decode_unavailable")
            raise ProxyError("decode_unavailable", f"{url}: {type(err).__name__}: {err}", 503) from None
        if reply.status_code == 200:
            self.decode.mark_ok(url)
            return reply
        content = await reply.aread()
        await reply.aclose()
        if reply.status_code < 500:
            raise _client_error(reply.status_code, content)
        self.backend.forget(url)
        error = api.decode_error(content)
        kind = "kv_load_failed" if error is not None and error.type == "kv_load_failed" else "decode_failed"
        self.metrics.backend_error("decode", kind)
        if error is None or error.type not in ("kv_load_failed", "not_ready"):
            self.decode.mark_failed(url)  # a failed load is the prefill's or the KV's, not decode's
        raise ProxyError(kind, f"{url}: {_message(content, reply.status_code)}", 502)

    # ---- rehearsals -----------------------------------------------------------------------------

    async def _rehearse(self, pair: Pair) -> None:
        """One request through this pair, as a client's goes (kvxfer.daemons.rehearsal)."""
        prefill_url, decode_url = pair
        path = "/v1/completions"
        body = {"model": await self.model_of(decode_url), "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                "temperature": 0.0}
        binding: Any = await self.backend.bind(self.client, decode_url, self.headers)  # the backend's own
        prefilled = await self.prefill_at(prefill_url, path, self.backend.prefill_body(body, binding))
        params = prefilled.get("kv_transfer_params")
        if not params:
            raise ProxyError("prefill_unavailable", f"{prefill_url} answered without kv_transfer_params", 502)
        self.saw_producer(params)
        reply = await self.decode_at(decode_url, path, decode_body(body, params))
        try:
            await reply.aread()
        finally:
            await reply.aclose()

    async def model_of(self, url: str) -> str:
        """The model a server serves (its /v1/models' first)."""
        reply = await self.client.get(f"{url}/v1/models", timeout=5.0, headers=self.headers)
        if reply.status_code != 200:
            raise ProxyError("decode_unavailable", f"{url}/v1/models: HTTP {reply.status_code}", 502)
        return reply.json()["data"][0]["id"]

    def ready_servers(self) -> tuple[list[str], list[str]]:
        """The prefill and decode servers whose last health check found them ready."""
        return ([u for u in self.prefill.urls if self._ready.get(u)],
                [u for u in self.decode.urls if self._ready.get(u)])

    def _failed(self, pool: Pool, url: str, kind: str) -> None:
        pool.mark_failed(url)
        self.metrics.backend_error(pool.name, kind)
        if pool is self.decode:
            self.backend.forget(url)

    # ---- health ---------------------------------------------------------------------------------

    async def check(self, url: str) -> bool:
        try:
            reply = await self.client.get(f"{url}{self.backend.ready_path}", timeout=2.0, headers=self.headers)
            return reply.status_code == 200
        except httpx.HTTPError:
            return False

    async def check_all(self) -> dict[str, int]:
        """Ask every server whether it is ready; a server that is not goes last in its pool."""
        counts = {}
        for pool in (self.prefill, self.decode):
            results = await asyncio.gather(*(self.check(u) for u in pool.urls))
            for url, ok in zip(pool.urls, results, strict=True):
                if ok:
                    pool.mark_ok(url)
                else:
                    self._failed(pool, url, "not_ready")
            counts[pool.name] = sum(results)
            self._turned_ready(pool, [u for u, ok in zip(pool.urls, results, strict=True) if ok])
        for pair, rehearsal in self.rehearsals.due(*self.ready_servers()):
            self._spawn(self.rehearsals.rehearse(pair, rehearsal, self.metrics.rehearsed))
        return counts

    # ---- introductions (kvxfer backend) ---------------------------------------------------------

    def saw_producer(self, found: dict[str, Any]) -> None:
        """A prefill service's identity or transfer parameters: every decode server hears of it
        once per boot epoch."""
        engine_id = found.get("engine_id")
        if self.backend.kind is not BackendKind.KVXFER or not isinstance(found.get("side_channel"), str) \
                or not isinstance(engine_id, str):
            return
        notice = {k: found.get(k) for k in ("side_channel", "engine_id", "boot_epoch")}
        known = self._producers.get(engine_id)
        if known is not None and known["boot_epoch"] == notice["boot_epoch"]:
            return
        self._producers[engine_id] = notice
        for url in self.decode.urls:
            self._spawn(self._introduce(url, notice))

    def _turned_ready(self, pool: Pool, ready: list[str]) -> None:
        """Prefill newly ready: learn who it is. Decode newly ready: tell it every producer."""
        for url in pool.urls:
            was, self._ready[url] = self._ready.get(url, False), url in ready
            if self._ready[url] and not was:
                self.rehearsals.turned_ready(url)
            if self._ready[url] and not was and self.backend.kind is BackendKind.KVXFER:
                if pool is self.prefill:
                    self._spawn(self._learn(url))
                else:
                    for notice in list(self._producers.values()):
                        self._spawn(self._introduce(url, notice))

    async def _learn(self, url: str) -> None:
        try:
            reply = await self.client.get(f"{url}/v1/kvxfer/identity", timeout=5.0, headers=self.headers)
            self.saw_producer(reply.json() if reply.status_code == 200 else {})
        except (httpx.HTTPError, ValueError) as err:
            log.info("could not ask prefill %s who it is (%s); decode meets it at its first request", url, err)

    async def _introduce(self, url: str, notice: dict[str, Any]) -> None:
        try:
            reply = await self.client.post(f"{url}/v1/kvxfer/producers", json=notice, timeout=5.0,
                                           headers=self.headers)
            what = "" if reply.status_code in (200, 202) else f"HTTP {reply.status_code}: {_message(reply.content, reply.status_code)}"
        except httpx.HTTPError as err:
            what = f"{type(err).__name__}: {err}"
        if what:
            log.info("could not introduce producer %s to decode %s (%s)", notice["engine_id"], url, what)

    def cancel_tasks(self) -> None:
        """At shutdown: the introductions and rehearsals still running end now."""
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, job) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    async def health_loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def models(self) -> Response:
        """Decode's /v1/models (every server of a deployment serves one model)."""
        for url in self.decode.order():
            with contextlib.suppress(httpx.HTTPError):
                reply = await self.client.get(f"{url}/v1/models", timeout=5.0, headers=self.headers)
                if reply.status_code == 200:
                    return Response(reply.content, media_type=JSON)
        return _error("decode_unavailable", "no decode server answered /v1/models", 503)


def _client_error(status: int, content: bytes) -> ProxyError:
    """A backend's 4xx: its own error body goes to the client, as it is."""
    error = api.decode_error(content)
    kind = error.type if error is not None else api.INVALID_REQUEST
    return ProxyError(kind, _message(content, status), status, body=content if error is not None else None)


def _message(content: bytes, status: int) -> str:
    error = api.decode_error(content)
    if error is not None:
        return error.message
    return content[:300].decode(errors="replace") or f"HTTP {status}"


def _error(kind: str, message: str, status: int, *, param: str | None = None) -> Response:
    return Response(api.error_json(kind, message, param=param), status_code=status, media_type=JSON)


def create_app(proxy: Proxy, *, api_keys: ApiKeys = NO_KEYS, health_checks: bool = True) -> FastAPI:
    app = FastAPI(title="kvxfer proxy")
    require_api_keys(app, api_keys, on_reject=lambda kind: proxy.metrics.outcome("auth", kind))
    tasks: list[asyncio.Task] = []

    @app.on_event("startup")
    async def start_health_checks() -> None:
        if health_checks:
            tasks.append(asyncio.get_running_loop().create_task(proxy.health_loop()))

    @app.on_event("shutdown")
    async def close() -> None:
        for task in tasks:
            task.cancel()
        proxy.cancel_tasks()
        await proxy.client.aclose()

    @app.get("/health")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/ready")
    async def ready() -> Response:
        """Ready when at least one prefill and one decode server report ready, and the first
        rehearsal of every pair of ready servers ended (answered or failed)."""
        counts = await proxy.check_all()
        rehearsing = proxy.rehearsals.pending(*proxy.ready_servers())
        ok = all(counts.values()) and not rehearsing
        return Response(msgspec.json.encode({"ready": ok, **counts, "rehearsing": rehearsing}),
                        status_code=200 if ok else 503, media_type=JSON)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(proxy.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        return await proxy.models()

    for path in ENDPOINTS:
        app.add_api_route(path, _endpoint(proxy, path), methods=["POST"])
    return app


def _endpoint(proxy: Proxy, path: str):
    async def endpoint(request: Request) -> Response:
        return await _complete(proxy, path, await request.body())

    return endpoint


def _validated(path: str, raw: bytes) -> tuple[dict[str, Any], bool] | Response:
    """(the body as the client sent it, whether it streams), or a 400 naming the bad field."""
    try:
        typed = ENDPOINTS[path](raw)
        body = msgspec.json.decode(raw)
    except msgspec.MsgspecError as err:
        bad = api.invalid_field(err)
        return _error(bad.type, bad.message, 400, param=bad.param)
    if not isinstance(body, dict):
        return _error(api.INVALID_REQUEST, "the body must be a JSON object", 400)
    return body, typed.stream


async def _complete(proxy: Proxy, path: str, raw: bytes) -> Response:
    started = time.monotonic()
    parsed = _validated(path, raw)
    if isinstance(parsed, Response):
        proxy.metrics.outcome(path, api.INVALID_REQUEST)
        return parsed
    body, stream = parsed
    try:
        reply = await asyncio.wait_for(proxy.start(path, body), timeout=proxy.timeout_s)
    except ProxyError as err:
        proxy.metrics.outcome(path, err.kind)
        if err.body is not None:
            return Response(err.body, status_code=err.status, media_type=JSON)
        return _error(err.kind, str(err), err.status)
    except asyncio.TimeoutError:
        proxy.metrics.outcome(path, "timeout")
        return _error("timeout", f"no answer within {proxy.timeout_s:.0f} s", 504)
    if stream:
        return StreamingResponse(_relay(proxy, path, reply, started), media_type="text/event-stream")
    try:
        content = await asyncio.wait_for(reply.aread(), timeout=proxy.timeout_s)
    except (asyncio.TimeoutError, httpx.HTTPError) as err:
        proxy.metrics.outcome(path, "decode_failed")
        return _error("decode_failed", f"decode stopped answering: {err!r}", 502)
    finally:
        await reply.aclose()
    proxy.metrics.outcome(path, "ok", started)
    return Response(content, media_type=JSON)


async def _relay(proxy: Proxy, path: str, reply: httpx.Response, started: float) -> AsyncIterator[bytes]:
    """Relay decode's event stream; a failure mid-stream ends it with an error event."""
    try:
        async for chunk in proxy.metrics.timed(reply.aiter_raw(), path, started):
            yield chunk
        proxy.metrics.outcome(path, "ok", started)
    except httpx.HTTPError as err:
        proxy.metrics.outcome(path, "decode_failed")
        yield api.sse(api.ErrorResponse(error=api.ErrorBody(
            type="decode_failed", message=f"decode stopped mid-stream: {err!r}")))
        yield api.SSE_DONE
    finally:
        await reply.aclose()
