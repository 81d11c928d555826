"""What the proxy talks to: pools of prefill and decode servers of one of two kinds, and how each
kind turns a client's request into its prefill and decode requests.

- `kvxfer`: kvxfer's own services. Decode is picked first: its identity (public key or engine id,
  from `/v1/kvxfer/identity`) binds the prefill's lease to it (`kvxfer_consumer`).
- `vllm`: vLLM OpenAI servers running KvxferConnector, driven by the two-step protocol of vLLM's
  P/D proxies: prefill with `kv_transfer_params: {"do_remote_decode": true}` and one token, then
  decode with the parameters the producer returned.

Both kinds then get the same thing from the proxy: the client's body, with the prefill's
`kv_transfer_params`, at decode (`decode_body`). Requests are dicts here, not Structs: the proxy
forwards every field a client sent (vLLM's `ignore_eos`, `return_token_ids`...) untouched.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import httpx
import msgspec

from kvxfer.agents.messages import Binding
from kvxfer.errors import ConfigError

COOLDOWN_S = 5.0  # a server that failed is tried last this long, unless a health check clears it
IDENTITY_TTL_S = 5.0


class BackendKind(str, Enum):
    KVXFER = "kvxfer"
    VLLM = "vllm"


BACKEND_VAR = "KVXFER_BACKEND"


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=[k.value for k in BackendKind], default=None,
                        help="what the --prefill and --decode servers are: kvxfer services, or vLLM "
                             "OpenAI servers with KvxferConnector (kv_producer / kv_consumer) "
                             f"(default: kvxfer) [env {BACKEND_VAR}]")


def backend_kind_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> BackendKind:
    value = args.backend or environ.get(BACKEND_VAR, "").strip() or BackendKind.KVXFER.value
    try:
        return BackendKind(value)
    except ValueError:
        raise ConfigError(f"{BACKEND_VAR}={value!r} (for --backend): must be one of "
                          f"{', '.join(k.value for k in BackendKind)}") from None


class ProxyError(Exception):
    """A request the proxy must answer with an error (a backend could not serve it, or refused
    it); `kind` becomes the error body's type."""

    def __init__(self, kind: str, message: str, status: int, *, body: bytes | None = None):
        super().__init__(message)
        self.kind, self.status = kind, status
        self.body = body  # the backend's own error body, relayed as it is (4xx: names the field)


@dataclass
class Pool:
    """Round-robin over the servers of one pool, those that failed recently (a request or a
    health check) last."""

    name: str  # "prefill" or "decode"
    urls: list[str]
    _next: itertools.count = field(default_factory=itertools.count)
    _failed_at: dict[str, float] = field(default_factory=dict)

    def order(self) -> list[str]:
        """All urls, starting at the next in turn, healthy ones first."""
        start = next(self._next) % len(self.urls)
        turn = self.urls[start:] + self.urls[:start]
        healthy = [u for u in turn if self.healthy(u)]
        return healthy + [u for u in turn if u not in healthy]

    def healthy(self, url: str) -> bool:
        return time.monotonic() - self._failed_at.get(url, -1e9) > COOLDOWN_S

    def mark_failed(self, url: str) -> None:
        self._failed_at[url] = time.monotonic()

    def mark_ok(self, url: str) -> None:
        self._failed_at.pop(url, None)


class KvxferBackend:
    kind = BackendKind.KVXFER
    ready_path = "/ready"  # 200 once every rank is up and warm

    def __init__(self) -> None:
        self._identities: dict[str, tuple[float, Binding]] = {}

    async def bind(self, client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> Binding:
        """The binding that lets decode `url` fetch the KV (cached a few seconds). Raises
        httpx.HTTPError or ValueError when the service does not say who it is."""
        cached = self._identities.get(url)
        if cached and time.monotonic() - cached[0] < IDENTITY_TTL_S:
            return cached[1]
        reply = await client.get(f"{url}/v1/kvxfer/identity", timeout=5.0, headers=headers)
        info = reply.json()
        if reply.status_code != 200 or not info.get("engine_id"):
            raise ValueError(f"HTTP {reply.status_code}")
        binding = Binding(consumer_key=info["public_key"]) if info.get("public_key") else \
            Binding(consumer_engine_id=info["engine_id"])
        self._identities[url] = (time.monotonic(), binding)
        return binding

    def forget(self, url: str) -> None:
        """Decode `url` failed: ask for its identity again (it may have restarted)."""
        self._identities.pop(url, None)

    def prefill_body(self, body: dict[str, Any], binding: Binding | None) -> dict[str, Any]:
        out = _without_stream(body)
        out["kv_transfer_params"] = None
        out["kvxfer_consumer"] = msgspec.to_builtins(binding)
        return out


class VllmBackend:
    kind = BackendKind.VLLM
    ready_path = "/health"  # vLLM's server listens only once its engine is up

    async def bind(self, client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
        return None  # the producer's parameters name no consumer

    def forget(self, url: str) -> None:
        pass

    def prefill_body(self, body: dict[str, Any], binding: None) -> dict[str, Any]:
        out = _without_stream(body)
        out["kv_transfer_params"] = {"do_remote_decode": True}
        out["max_tokens"] = 1
        if "max_completion_tokens" in out:
            out["max_completion_tokens"] = 1
        return out


Backend = KvxferBackend | VllmBackend


def make_backend(kind: BackendKind) -> Backend:
    return KvxferBackend() if kind is BackendKind.KVXFER else VllmBackend()


def decode_body(body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The client's request as decode gets it: unchanged, plus the prefill's parameters."""
    return {**body, "kv_transfer_params": params}


def _without_stream(body: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k != "stream_options"}
    out["stream"] = False
    return out
