"""The HTTP face of a prefill or decode service (FastAPI on uvicorn).

`/health`: the process answers. `/ready`: 200 only when every rank is up, caches are registered,
the side channel listens and kernels are warm (`Service.ready`); 503 with the reason otherwise.
`/metrics`: Prometheus text. `/v1/models`, `/v1/completions`, `/v1/chat/completions`: the OpenAI
API, the role's half of each answer (chat through `formats.ChatFormat`). `/v1/kvxfer/identity`:
who this service is (engine id, boot epoch, public key) for the proxy. With API keys every path
but the probes' wants `Authorization: Bearer KEY` (`auth.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from kvxfer.daemons import api
from kvxfer.daemons.auth import NO_KEYS, ApiKeys, require_api_keys
from kvxfer.daemons.chat_template import TemplateError, load_chat_template
from kvxfer.daemons.config import ServeConfig
from kvxfer.daemons.decode import DecodeService, LoadFailed
from kvxfer.daemons.formats import ChatFormat, CompletionsFormat, Format
from kvxfer.daemons.prefill import PrefillService
from kvxfer.daemons.service import Service
from kvxfer.daemons.stop_text import StopText
from kvxfer.daemons.warm import add_routes as add_producer_routes
from kvxfer.errors import ConfigError, KvxferError

log = logging.getLogger(__name__)
JSON = "application/json"


def error(kind: str, message: str, status: int, *, param: str | None = None, code: str | None = None) -> Response:
    return Response(api.error_json(kind, message, param=param, code=code), status_code=status, media_type=JSON)


def served_model(config: ServeConfig) -> str:
    """The model's name in /v1/models and answers: the preset, or the model directory's name."""
    return config.preset or (config.model_dir.name if config.model_dir else "kvxfer")


def create_app(service: Service, *, api_keys: ApiKeys = NO_KEYS) -> FastAPI:
    app = FastAPI(title=f"kvxfer {service.config.role.value}")
    require_api_keys(app, api_keys, on_reject=lambda kind: service.metrics.requests.labels(kind).inc())
    model = served_model(service.config)
    formats: tuple[Format, ...] = (CompletionsFormat(), ChatFormat(load_chat_template(service.config.model_dir)))

    @app.get("/health")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/ready")
    async def ready() -> Response:
        if service.ready:
            return Response(b'{"ready":true}', media_type=JSON)
        body = msgspec.json.encode({"ready": False, "reason": service.why_not_ready()})
        return Response(body, status_code=503, media_type=JSON)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.transfer.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        return Response(msgspec.json.encode(api.ModelList(data=[api.Model(id=model)])), media_type=JSON)

    @app.get("/v1/kvxfer/identity")
    async def identity() -> Response:
        info = {"engine_id": service.config.engine_id, "boot_epoch": service.boot_epoch,
                "role": service.config.role.value, "tp_size": service.config.tp,
                "blocks_in_use": service.blocks_in_use() if service.ready else None}
        if isinstance(service, DecodeService) and service.ready:
            info.update(service.identity())
        if isinstance(service, PrefillService) and service.ready:  # what decode meets it by (warm.py)
            info["side_channel"] = service.ranks[0].side_channel
        return Response(msgspec.json.encode(info), media_type=JSON)

    if isinstance(service, DecodeService):
        add_producer_routes(app, service.producers)

    for fmt in formats:
        app.add_api_route(fmt.path, _endpoint(service, fmt, model), methods=["POST"])
    return app


def _endpoint(service: Service, fmt: Format, model: str):
    async def endpoint(request: Request) -> Response:
        return await _complete(service, fmt, model, await request.body())

    return endpoint


def _parse(service: Service, fmt: Format, model: str, raw: bytes) -> api.CompletionRequest | Response:
    """The request, or the 4xx answer that says which field is wrong."""
    try:
        body = fmt.decode(raw)
    except msgspec.MsgspecError as err:
        bad = api.invalid_field(err)
        return error(bad.type, bad.message, 400, param=bad.param)
    except TemplateError as err:
        return error(api.INVALID_REQUEST, str(err), 400, param="messages")
    if body.model and body.model != model:
        return error(api.NOT_FOUND, f"model {body.model!r} is not served here; /v1/models lists {model!r}",
                     404, param="model", code="model_not_found")
    return body


async def _complete(service: Service, fmt: Format, model: str, raw: bytes) -> Response:
    if not service.ready:
        return error("not_ready", service.why_not_ready(), 503)
    body = _parse(service, fmt, model, raw)
    if isinstance(body, Response):
        service.metrics.requests.labels("invalid_request").inc()
        return body
    body = msgspec.structs.replace(body, model=body.model or model)
    started = time.monotonic()
    outcome = "error"
    try:
        if isinstance(service, PrefillService):
            response = await service.complete(body)
            outcome = "ok"
            return Response(msgspec.json.encode(fmt.whole(response)), media_type=JSON)
        response = await _decode(service, fmt, body, started)
        outcome = "ok"  # a stream counts its own outcome when it ends (`_stream`)
        return response
    except ConfigError as err:
        outcome = "invalid_request"
        return error(api.INVALID_REQUEST, str(err), 400)
    except LoadFailed as err:
        outcome = "kv_load_failed"
        return error("kv_load_failed", str(err), 502)
    except KvxferError as err:
        outcome = err.kind
        log.warning("request failed (%s): %s", err.kind, err)
        return error(err.kind, str(err), 503 if err.kind in ("allocation",) else 500)
    except Exception as err:  # a bug of ours: a typed answer, one log line, one metric
        outcome = "internal"
        log.exception("request failed with an unexpected %s", type(err).__name__)
        service.metrics.transfer.observe_failure("internal")
        return error("internal", f"internal error: {type(err).__name__}", 500)
    finally:
        if isinstance(service, PrefillService) or not body.stream:
            service.metrics.requests.labels(outcome).inc()
            service.metrics.request_seconds.observe(time.monotonic() - started)


async def _decode(service: DecodeService, fmt: Format, body: api.CompletionRequest, started: float) -> Response:
    tokens = service.generate(body)
    first, stats = await anext(tokens)  # the load: errors surface here, before any byte is sent
    rid = api.completion_id(body.kv_transfer_params.request_id)
    pieces = _pieces(tokens, first, StopText(service.tokenizer.decode, body.stops), body.max_tokens)
    if body.stream:
        return StreamingResponse(_stream(service, fmt, body, tokens, pieces, stats, rid, started),
                                 media_type="text/event-stream")
    ids, text, finish = [], [], None
    try:
        async for token, piece, reason in pieces:
            ids.append(token)
            text.append(piece)
            finish = reason
    finally:
        await tokens.aclose()
    response = _response(body, rid, ids, "".join(text), finish, stats, _usage(body, len(ids)))
    return Response(msgspec.json.encode(fmt.whole(response)), media_type=JSON)


async def _pieces(tokens: AsyncIterator, first: int, text: StopText,
                  max_tokens: int) -> AsyncIterator[tuple[int, str, str | None]]:
    """(token, the text it makes certain, finish reason on the last) until max_tokens or a stop
    string: "length" or "stop", as OpenAI reports them."""

    async def every_token() -> AsyncIterator[int]:
        yield first
        async for token, _ in tokens:
            yield token

    async for token in every_token():
        piece = text.push(token)
        finish = "stop" if text.stopped else "length" if text.num_tokens >= max_tokens else None
        if finish == "length":
            piece += text.flush()
        yield token, piece, finish
        if finish is not None:
            return


def _response(body: api.CompletionRequest, rid: str, ids: list[int], text: str, finish: str | None,
              stats: api.TransferStats | None, usage: api.Usage | None = None) -> api.CompletionResponse:
    return api.CompletionResponse(id=rid, model=body.model, kvxfer=stats, usage=usage, choices=[
        api.Choice(text=text, token_ids=ids, finish_reason=finish)])


def _usage(body: api.CompletionRequest, num_generated: int) -> api.Usage:
    prompt_tokens = body.kv_transfer_params.num_tokens
    return api.Usage(prompt_tokens=prompt_tokens, completion_tokens=num_generated,
                     total_tokens=prompt_tokens + num_generated)


async def _stream(service, fmt, body, tokens, pieces, stats, rid, started) -> AsyncIterator[bytes]:
    outcome, count = "cancelled", 0
    try:
        async for token, piece, finish in pieces:
            chunk = _response(body, rid, [token], piece, finish, stats if count == 0 else None)
            yield api.sse(fmt.chunk(chunk, first=count == 0))
            count += 1
        if body.include_usage:
            last = api.CompletionResponse(id=rid, model=body.model, choices=[], usage=_usage(body, count))
            yield api.sse(fmt.chunk(last, first=False))
        yield api.SSE_DONE
        outcome = "ok"
    except KvxferError as err:
        outcome = err.kind
        yield api.sse(api.ErrorResponse(error=api.ErrorBody(type=err.kind, message=str(err))))
        yield api.SSE_DONE
    finally:
        await tokens.aclose()
        service.metrics.requests.labels(outcome).inc()
        service.metrics.request_seconds.observe(time.monotonic() - started)
