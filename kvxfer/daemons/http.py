"""The HTTP face of a prefill or decode service (FastAPI on uvicorn).

`/health`: the process answers. `/ready`: 200 only when every rank is up, caches are registered,
the side channel listens and kernels are warm (`Service.ready`); 503 with the reason otherwise.
`/metrics`: Prometheus text. `/v1/completions`: the role's half of a completion.
`/v1/kvxfer/identity`: who this service is (engine id, boot epoch, public key) for the proxy.
"""

from __future__ import annotations

import logging
import time

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from kvxfer.daemons import api
from kvxfer.daemons.decode import DecodeService, LoadFailed
from kvxfer.daemons.prefill import PrefillService
from kvxfer.daemons.service import Service
from kvxfer.errors import ConfigError, KvxferError

log = logging.getLogger(__name__)
JSON = "application/json"


def error(kind: str, message: str, status: int) -> Response:
    return Response(api.error_json(kind, message, status), status_code=status, media_type=JSON)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title=f"kvxfer {service.config.role.value}")

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

    @app.get("/v1/kvxfer/identity")
    async def identity() -> Response:
        info = {"engine_id": service.config.engine_id, "boot_epoch": service.boot_epoch,
                "role": service.config.role.value, "tp_size": service.config.tp,
                "blocks_in_use": service.blocks_in_use() if service.ready else None}
        if isinstance(service, DecodeService) and service.ready:
            info.update(service.identity())
        return Response(msgspec.json.encode(info), media_type=JSON)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        if not service.ready:
            return error("not_ready", service.why_not_ready(), 503)
        try:
            body = api.decode_request(await request.body())
        except msgspec.MsgspecError as err:
            service.metrics.requests.labels("invalid_request").inc()
            return error("invalid_request", str(err), 400)
        started = time.monotonic()
        outcome = "error"
        try:
            if isinstance(service, PrefillService):
                response = await service.complete(body)
                outcome = "ok"
                return Response(msgspec.json.encode(response), media_type=JSON)
            response = await _decode(service, body, started)
            outcome = "ok"  # a stream counts its own outcome when it ends (`_stream`)
            return response
        except ConfigError as err:
            outcome = "invalid_request"
            return error("invalid_request", str(err), 400)
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

    return app


async def _decode(service: DecodeService, body: api.CompletionRequest, started: float) -> Response:
    tokens = service.generate(body)
    first, stats = await anext(tokens)  # the load: errors surface here, before any byte is sent
    rid = api.completion_id(body.kv_transfer_params.request_id)
    if body.stream:
        return StreamingResponse(_stream(service, body, tokens, first, stats, rid, started),
                                 media_type="text/event-stream")
    ids = [first]
    async for token, _ in tokens:
        ids.append(token)
    return Response(msgspec.json.encode(_response(service, body, rid, ids, stats, "length")), media_type=JSON)


def _response(service: DecodeService, body: api.CompletionRequest, rid: str, ids: list[int],
              stats: api.TransferStats | None, finish: str | None) -> api.CompletionResponse:
    prompt_tokens = body.kv_transfer_params.num_tokens
    return api.CompletionResponse(
        id=rid, model=body.model,
        choices=[api.Choice(text=service.tokenizer.decode(ids), token_ids=ids, finish_reason=finish)],
        usage=api.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(ids),
                        total_tokens=prompt_tokens + len(ids)),
        kvxfer=stats)


async def _stream(service, body, tokens, first, stats, rid, started):
    outcome = "cancelled"
    try:
        yield api.sse(_response(service, body, rid, [first], stats, None))
        count = 1
        async for token, _ in tokens:
            count += 1
            finish = "length" if count == body.max_tokens else None
            yield api.sse(_response(service, body, rid, [token], None, finish))
        yield b"data: [DONE]\n\n"
        outcome = "ok"
    except KvxferError as err:
        outcome = err.kind
        yield api.sse(api.ErrorResponse(error=api.ErrorBody(type=err.kind, message=str(err), code=500)))
        yield b"data: [DONE]\n\n"
    finally:
        await tokens.aclose()
        service.metrics.requests.labels(outcome).inc()
        service.metrics.request_seconds.observe(time.monotonic() - started)
