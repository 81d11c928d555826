"""`kv_transfer_params`: what vLLM's two-step P/D proxy carries from the producer to the consumer.

The proxy sends the producer `{"do_remote_decode": true}` (and max_tokens=1), takes the
`kv_transfer_params` of the producer's answer and sends them, unchanged, with the prompt to the
consumer. Ours are kvxfer's own `TransferParams` (kvxfer.agents.messages) as JSON, plus vLLM's two
flags so that proxies written for vLLM's NixlConnector work unchanged. A proxy that forwards only
kvxfer's fields (kvxfer's own proxy) works too.

Also here: the scheduler -> worker jobs, one frozen record per thing a worker must do. They cross
process boundaries inside vLLM's SchedulerOutput (vLLM pickles it between its own processes); they
never cross a trust boundary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from kvxfer.agents.messages import Binding, TransferParams

log = logging.getLogger(__name__)

# vLLM's flags, as its NixlConnector and the example proxies use them.
DO_REMOTE_DECODE = "do_remote_decode"  # proxy -> producer: keep this request's KV for a consumer
DO_REMOTE_PREFILL = "do_remote_prefill"  # producer -> consumer: load this request's KV
CONSUMER_KEY = "consumer_key"  # proxy -> producer (optional): bind the request to this CURVE key


def wants_remote_decode(params: dict[str, Any] | None) -> bool:
    """Producer: is this request's KV to be kept for a consumer?"""
    return bool(params) and bool(params.get(DO_REMOTE_DECODE))


def consumer_params(params: dict[str, Any] | None) -> TransferParams | None:
    """Consumer: the producer's TransferParams of a request, or None for a request to compute
    locally. Malformed parameters are logged (the request is then computed locally)."""
    if not params or params.get(DO_REMOTE_PREFILL) is False:
        return None
    if not params.get(DO_REMOTE_PREFILL) and not ("side_channel" in params and "request_id" in params):
        return None
    try:
        return msgspec.convert(params, TransferParams)
    except msgspec.ValidationError as err:
        log.warning("kv_transfer_params not usable, computing the request locally: %s", err)
        return None


def producer_reply(params: TransferParams) -> dict[str, Any]:
    """The `kv_transfer_params` a producer returns: kvxfer's fields and vLLM's flags."""
    reply: dict[str, Any] = msgspec.to_builtins(params)
    reply[DO_REMOTE_PREFILL] = True
    reply[DO_REMOTE_DECODE] = False
    return reply


def binding_for(params: dict[str, Any] | None, allowed_keys: frozenset[bytes]) -> Binding:
    """Which consumer may act on a request: the key the proxy named, else the only allowed key,
    else none (the unguessable request id is then the only capability)."""
    named = (params or {}).get(CONSUMER_KEY)
    if named:
        return Binding(consumer_key=str(named))
    if len(allowed_keys) == 1:
        return Binding(consumer_key=next(iter(allowed_keys)).decode())
    return Binding()


@dataclass(frozen=True)
class SendJob:
    """Producer: keep request `req_id`'s blocks for its consumer (READ) or push them (WRITE)."""

    req_id: str  # vLLM's request id
    params: TransferParams  # what the consumer was told (transfer id, kernel block ids, binding)


@dataclass(frozen=True)
class LoadJob:
    """Consumer: load tokens [skip_tokens, skip_tokens + num_tokens) of the producer's request
    into `local_ids` (the blocks vLLM allocated; earlier tokens hit the local prefix cache)."""

    req_id: str
    params: TransferParams
    local_ids: tuple[int, ...]  # vLLM's (manager) ids: the worker maps them to kernel ids, failures report these
    skip_tokens: int
    num_tokens: int
    valid_until_ms: int = 0  # the lease's latest end the scheduler's heartbeat knows (0: the params')


@dataclass(frozen=True)
class ReleaseJob:
    """Consumer: the producer's KV will not be read (local cache hit, or the request ended before
    it was scheduled); tell the producer so it frees the blocks now instead of at lease expiry."""

    req_id: str
    params: TransferParams
    reason: str
