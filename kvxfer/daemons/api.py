"""The HTTP API shared by the prefill and decode services and the proxy: an OpenAI-compatible
`/v1/completions` subset, as msgspec Structs so a malformed body gets an error naming its field.

`kv_transfer_params` (kvxfer's `TransferParams`) is what a prefill service returns and a decode
service needs; the proxy carries it from one to the other. `kvxfer` reports what the transfer
cost, so a client (the demo, the soak) can show it per request.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated

import msgspec

from kvxfer.agents.messages import Binding, TransferParams

MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=65536)]
TokenIds = Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]], msgspec.Meta(min_length=1, max_length=1 << 20)]


class CompletionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=1 << 22)] | TokenIds
    max_tokens: MaxTokens = 16
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.0
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] | None = None  # the engine multiplies it by ~2**20
    stream: bool = False
    model: str = ""
    kv_transfer_params: TransferParams | None = None
    # Which decode service may fetch the KV (the proxy asks decode's /v1/kvxfer/identity).
    kvxfer_consumer: Binding | None = None


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


class CompletionResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    object: str = "text_completion"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    model: str = ""
    choices: list[Choice] = []
    usage: Usage = msgspec.field(default_factory=Usage)
    kv_transfer_params: TransferParams | None = None
    kvxfer: TransferStats | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    type: str  # e.g. "invalid_request", "prefill_unavailable", "kv_load_failed", "timeout"
    message: str
    code: int = 500


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody


_request_decoder = msgspec.json.Decoder(CompletionRequest)
_response_decoder = msgspec.json.Decoder(CompletionResponse)


def decode_request(body: bytes) -> CompletionRequest:
    return _request_decoder.decode(body)


def decode_response(body: bytes) -> CompletionResponse:
    return _response_decoder.decode(body)


def completion_id(request_id: str) -> str:
    """The OpenAI-style id of a completion: the same on prefill and decode (so they correlate),
    but a hash, never a piece of the request id (an unguessable capability on the side channel)."""
    return "cmpl-" + hashlib.sha256(request_id.encode()).hexdigest()[:24]


def error_json(kind: str, message: str, code: int) -> bytes:
    return msgspec.json.encode(ErrorResponse(error=ErrorBody(type=kind, message=message, code=code)))


def sse(obj: msgspec.Struct | str) -> bytes:
    """One server-sent event line."""
    payload = obj.encode() if isinstance(obj, str) else msgspec.json.encode(obj)
    return b"data: " + payload + b"\n\n"
