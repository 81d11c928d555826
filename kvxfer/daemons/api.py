"""The HTTP API shared by the prefill and decode services and the proxy: the OpenAI
`/v1/completions` and `/v1/models` shapes, as msgspec Structs so a malformed body gets an error
naming its field (`invalid_field`). Chat lives in `chat.py`, on top of these.

`kv_transfer_params` (kvxfer's `TransferParams`) is what a prefill service returns and a decode
service needs; the proxy carries it from one to the other. `kvxfer` reports what the transfer
cost, so a client (the demo, the soak) can show it per request.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Annotated

import msgspec

from kvxfer.agents.messages import Binding, TransferParams

MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=65536)]
TokenIds = Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]], msgspec.Meta(min_length=1, max_length=1 << 20)]
StopString = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
DEFAULT_MAX_TOKENS = 16


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    include_usage: bool = False  # one last chunk with `usage` and no choices


class Generation(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """What completions and chat requests share. Fields OpenAI defines and kvxfer does not use
    (top_p, penalties, user...) are ignored; `n` above 1 is refused."""

    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.0
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] | None = None  # the engine multiplies it by ~2**20
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], msgspec.Meta(max_length=16)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    model: str = ""
    kv_transfer_params: TransferParams | None = None
    # Which decode service may fetch the KV (the proxy asks decode's /v1/kvxfer/identity).
    kvxfer_consumer: Binding | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Generation, kw_only=True, forbid_unknown_fields=False):
    prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=1 << 22)] | TokenIds


class TransferStats(msgspec.Struct, kw_only=True):
    """What moving one request's KV cost, summed over the decode ranks."""

    mode: str = "read"
    bytes: int = 0
    descriptors: int = 0
    transfer_ms: float = 0.0
    gbps: float = 0.0
    peers: int = 0
    path: str = "direct"  # or "staged": gathered, one descriptor per part, scattered


class Choice(msgspec.Struct, kw_only=True):
    index: int = 0
    text: str = ""
    token_ids: list[int] = []
    finish_reason: str | None = None
    logprobs: None = None


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    model: str = ""
    choices: list[Choice]  # no default: present (maybe empty) in every answer and chunk
    usage: Usage | None = None  # None in stream chunks but the last (`stream_options.include_usage`)
    kv_transfer_params: TransferParams | None = None
    kvxfer: TransferStats | None = None


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "kvxfer"


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[Model] = []


# ---- errors ---------------------------------------------------------------------------------------

# `type` of an error body: OpenAI's names for the client's faults, kvxfer's kinds for the rest
# ("prefill_unavailable", "kv_load_failed", "timeout", ...), which clients and the soak match on.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None  # the request field at fault, e.g. "messages[0].role"
    code: str | None = None  # e.g. "invalid_api_key", "model_not_found"


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody


_request_decoder = msgspec.json.Decoder(CompletionRequest)
_response_decoder = msgspec.json.Decoder(CompletionResponse)
_error_decoder = msgspec.json.Decoder(ErrorResponse)
_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")


def decode_request(body: bytes) -> CompletionRequest:
    return _request_decoder.decode(body)


def decode_response(body: bytes) -> CompletionResponse:
    return _response_decoder.decode(body)


def decode_error(body: bytes) -> ErrorBody | None:
    """The error body of a kvxfer or OpenAI-compatible server, or None if it is not one."""
    try:
        return _error_decoder.decode(body).error
    except msgspec.MsgspecError:
        return None


def invalid_field(err: msgspec.MsgspecError) -> ErrorBody:
    """A 400 body for a request msgspec refused; `param` names the field (`messages[0].role`),
    from the path msgspec puts at the end of its message."""
    message = str(err)
    param = None
    if (at := _AT_PATH.search(message)) is not None:
        param = at["path"] or None
    if (missing := _MISSING.search(message)) is not None:
        param = f"{param}.{missing['field']}" if param else missing["field"]
    return ErrorBody(message=message, type=INVALID_REQUEST, param=param)


def completion_id(request_id: str) -> str:
    """The OpenAI-style id of a completion: the same on prefill and decode (so they correlate),
    but a hash, never a piece of the request id (an unguessable capability on the side channel)."""
    return "cmpl-" + hashlib.sha256(request_id.encode()).hexdigest()[:24]


def error_json(kind: str, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    return msgspec.json.encode(ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code)))


def sse(obj: msgspec.Struct | str) -> bytes:
    """One server-sent event line."""
    payload = obj.encode() if isinstance(obj, str) else msgspec.json.encode(obj)
    return b"data: " + payload + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
