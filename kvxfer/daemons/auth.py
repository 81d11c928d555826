"""API keys of the HTTP face of the proxy and the services: `Authorization: Bearer KEY`, as
OpenAI clients send it (`OpenAI(api_key=...)`), checked against a set of keys (several, so a key
can be rotated without downtime). Without keys the API is open, as before.

Keys come from `--api-key` (repeatable; visible in `ps`, so for experiments),
`KVXFER_API_KEY` (comma-separated) or `--api-key-file` (one key per line, `#` comments; a
Kubernetes Secret mounted as a file or passed as the variable). The probes' paths (/health,
/ready, /metrics) stay open: kubelets and Prometheus scrape without a key. The proxy presents its
own key to backends that want one (`--backend-api-key-file` / `KVXFER_BACKEND_API_KEY`).
"""

from __future__ import annotations

import argparse
import hmac
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kvxfer.daemons import api
from kvxfer.errors import ConfigError

log = logging.getLogger(__name__)

API_KEY_VAR = "KVXFER_API_KEY"
API_KEY_FILE_VAR = "KVXFER_API_KEY_FILE"
BACKEND_KEY_VAR = "KVXFER_BACKEND_API_KEY"
BACKEND_KEY_FILE_VAR = "KVXFER_BACKEND_API_KEY_FILE"
# Variables with no flag of their own name (the key itself, not a file).
KEY_ONLY_ENV_VARS = (BACKEND_KEY_VAR,)
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
MIN_KEY_CHARS = 8
_KEY = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: it travels in a header


@dataclass(frozen=True)
class ApiKeys:
    """The keys a server accepts; empty: no authentication. Never printed."""

    keys: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value carries one of the keys. Compares every key in
        constant time, so the time taken says nothing about how much of a key was right."""
        if not self.enabled:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given_bytes = given.strip().encode()
        return sum(hmac.compare_digest(given_bytes, key) for key in self.keys) > 0


NO_KEYS = ApiKeys()


def add_api_key_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("API keys (Authorization: Bearer; /health, /ready and /metrics stay open)")
    g.add_argument("--api-key", action="append", metavar="KEY", default=None,
                   help=f"accept this key; repeatable; visible to local users in `ps`: prefer the variable or the file [env {API_KEY_VAR}, comma-separated]")
    g.add_argument("--api-key-file", metavar="FILE", default=None,
                   help=f"accept the keys in FILE, one per line, '#' comments [env {API_KEY_FILE_VAR}]")


def add_backend_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend-api-key-file", metavar="FILE", default=None,
                        help=f"the key the proxy sends to its backends (first key of FILE), for services or vLLM servers started with an API key [env {BACKEND_KEY_FILE_VAR}, or the key itself in {BACKEND_KEY_VAR}]")


def api_keys_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ApiKeys:
    """Every key from the flags, the variable and the file, together (flag, variable and file
    may each add keys: a rotation runs the old and the new key side by side)."""
    keys: list[tuple[str, str]] = []
    for key in args.api_key or ():
        keys.append(("--api-key", key))
    keys += [(API_KEY_VAR, k) for k in re.split(r"[,\s]+", environ.get(API_KEY_VAR, "")) if k]
    path = args.api_key_file or environ.get(API_KEY_FILE_VAR, "").strip() or None
    if path is not None:
        where = "--api-key-file" if args.api_key_file else API_KEY_FILE_VAR
        keys += [(f"{where}={path!r}", k) for k in _read_keys(Path(path), where)]
    for index, (where, key) in enumerate(keys):
        _check_key(where, index, key)
    return ApiKeys(tuple(dict.fromkeys(key.encode() for _, key in keys)))


def backend_key_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    path = args.backend_api_key_file or environ.get(BACKEND_KEY_FILE_VAR, "").strip() or None
    if path is not None:
        where = "--backend-api-key-file" if args.backend_api_key_file else BACKEND_KEY_FILE_VAR
        keys = _read_keys(Path(path), where)
        if not keys:
            raise ConfigError(f"{where}={path!r}: no key in the file")
        _check_key(where, 0, keys[0])
        return keys[0]
    key = environ.get(BACKEND_KEY_VAR, "").strip() or None
    if key is not None:
        _check_key(BACKEND_KEY_VAR, 0, key)
    return key


def _read_keys(path: Path, where: str) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"{where}={str(path)!r}: cannot read ({err.strerror})") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _check_key(where: str, index: int, key: str) -> None:
    """Refuse keys that cannot work; the message names where the key came from, never the key."""
    if not _KEY.fullmatch(key):
        raise ConfigError(f"{where}: API key {index} has spaces or characters outside printable ASCII")
    if len(key) < MIN_KEY_CHARS:
        raise ConfigError(f"{where}: API key {index} has {len(key)} characters; at least {MIN_KEY_CHARS} "
                          "(generate one with `openssl rand -hex 32`)")


class ApiKeyMiddleware:
    """ASGI middleware answering 401 (OpenAI's error body) to requests without an accepted key.
    Pure ASGI rather than a FastAPI `BaseHTTPMiddleware`, which buffers streaming answers."""

    def __init__(self, app, *, keys: ApiKeys, on_reject: Callable[[str], None] | None = None) -> None:
        self.app, self.keys, self.on_reject = app, keys, on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or not self.keys.enabled:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        if self.keys.allows(header.decode("latin-1") if header is not None else None):
            return await self.app(scope, receive, send)
        why = ("no API key: send the header `Authorization: Bearer KEY`" if header is None
               else "the API key is not one this server accepts")
        log.debug("%s %s refused: %s", scope.get("method"), scope["path"], why)
        if self.on_reject is not None:
            self.on_reject("missing_api_key" if header is None else "invalid_api_key")
        body = api.error_json(api.AUTHENTICATION, why, code="invalid_api_key")
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def require_api_keys(app, keys: ApiKeys, *, on_reject: Callable[[str], None] | None = None) -> None:
    """Install the key check on a FastAPI app (nothing when `keys` is empty)."""
    if keys.enabled:
        app.add_middleware(ApiKeyMiddleware, keys=keys, on_reject=on_reject)
