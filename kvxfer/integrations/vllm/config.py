"""The connector's settings: `kv_connector_extra_config` parsed once into a typed, validated
dataclass, plus the checks that refuse vLLM setups the connector does not support.

Only this module reads vLLM's config objects for settings; everything else takes `ConnectorConfig`.
Keys of `kv_connector_extra_config` (all optional unless said):

| key | meaning | default |
| --- | --- | --- |
| `side_channel_host` | where a producer's side channel listens | `127.0.0.1` |
| `side_channel_port` | producer: TP rank r listens on port + r (required for producers) | - |
| `advertise_host` | the host consumers dial (when listening on a wildcard) | side_channel_host |
| `mode` | `read` (consumer pulls) or `write` (producer pushes) | `read` |
| `lease_s` | producer holds a request's blocks at most this long | 30 |
| `transfer_deadline_s` | slack of each transfer's deadline (plus bytes / expected_gbps) | 5 |
| `expected_gbps` | pessimistic bandwidth for deadlines | 0.5 |
| `handshake_timeout_s` | side-channel calls | 10 |
| `curve_secret_key` / `curve_secret_key_file` | this instance's CURVE key pair | - |
| `curve_server_key` / `curve_server_key_file` | consumer: the producers' public key | - |
| `curve_allowed_keys` / `curve_allowed_keys_dir` | producer: consumers' public keys | - |
| `insecure_plaintext` | no CURVE (loopback only, for experiments) | false |
| `model_fingerprint` | overrides the fingerprint derived from the model's shape | - |
| `nixl_progress_thread` | NIXL's own progress thread instead of polling | false |
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from kvxfer.agents.keys import (
    KeyConfig,
    KeyPair,
    load_allowed_keys,
    load_keypair,
    load_public_key,
    parse_key,
)
from kvxfer.daemons.config import is_loopback
from kvxfer.deadline import Deadline
from kvxfer.errors import ConfigError

_KNOWN_KEYS = frozenset({
    "side_channel_host", "side_channel_port", "advertise_host", "mode", "lease_s",
    "transfer_deadline_s", "expected_gbps", "handshake_timeout_s", "curve_secret_key",
    "curve_secret_key_file", "curve_server_key", "curve_server_key_file", "curve_allowed_keys",
    "curve_allowed_keys_dir", "insecure_plaintext", "model_fingerprint", "nixl_progress_thread",
})
_WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]")
_DEADLINE = Deadline()  # transfer_deadline_s and expected_gbps default to its fields


class ConnectorRole(Enum):
    PRODUCER = "kv_producer"  # prefill: computes KV, holds it under leases, serves it
    CONSUMER = "kv_consumer"  # decode: loads KV the producer computed


class TransferMode(Enum):
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
    role: ConnectorRole
    engine_id: str
    mode: TransferMode = TransferMode.READ
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 0
    advertise_host: str = "127.0.0.1"
    lease_s: float = 30.0
    transfer_deadline_s: float = _DEADLINE.slack_s
    expected_gbps: float = _DEADLINE.expected_gbps
    handshake_timeout_s: float = 10.0
    keys: KeyConfig | None = None  # None exactly when insecure
    insecure: bool = False
    model_fingerprint: str = ""
    nixl_progress_thread: bool = False

    def side_channel_address(self, rank: int) -> str:
        return f"tcp://{self.advertise_host}:{self.side_channel_port + rank}"


def parse_config(extra: dict[str, Any], *, role: str | None, engine_id: str,
                 default_fingerprint: str) -> ConnectorConfig:
    """Validate `kv_connector_extra_config`; every error names the key and says what is expected."""
    unknown = sorted(set(extra) - _KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"kv_connector_extra_config: unknown key(s) {unknown}; known: {sorted(_KNOWN_KEYS)}")
    if role not in ("kv_producer", "kv_consumer"):
        raise ConfigError(f"kv_role={role!r}: KvxferConnector needs 'kv_producer' (prefill) or "
                          f"'kv_consumer' (decode); 'kv_both' is not supported")
    connector_role = ConnectorRole(role)
    insecure = _flag(extra, "insecure_plaintext")
    host = str(extra.get("side_channel_host", "127.0.0.1"))
    advertise = str(extra.get("advertise_host", host))
    if advertise in _WILDCARD_HOSTS:
        raise ConfigError(f"advertise_host={advertise!r}: consumers cannot dial a wildcard; set "
                          f"advertise_host to this machine's address")
    port = _number(extra, "side_channel_port", 0, lo=0, hi=65535, kind=int)
    if connector_role is ConnectorRole.PRODUCER and port == 0:
        raise ConfigError("side_channel_port: required for a kv_producer (TP rank r listens on "
                          "side_channel_port + r)")
    if insecure and not is_loopback(host):
        raise ConfigError(f"insecure_plaintext: only on loopback, but side_channel_host={host!r}; "
                          f"use CURVE keys")
    config = ConnectorConfig(
        role=connector_role,
        engine_id=engine_id,
        mode=_mode(extra),
        side_channel_host=host,
        side_channel_port=port,
        advertise_host=advertise,
        lease_s=_number(extra, "lease_s", 30.0, lo=0.1),
        transfer_deadline_s=_number(extra, "transfer_deadline_s", _DEADLINE.slack_s, lo=0.01),
        expected_gbps=_number(extra, "expected_gbps", _DEADLINE.expected_gbps, lo=1e-6),
        handshake_timeout_s=_number(extra, "handshake_timeout_s", 10.0, lo=0.01),
        keys=None if insecure else _keys(extra, connector_role),
        insecure=insecure,
        model_fingerprint=str(extra.get("model_fingerprint") or default_fingerprint),
        nixl_progress_thread=_flag(extra, "nixl_progress_thread"),
    )
    if config.lease_s <= config.transfer_deadline_s:
        raise ConfigError(f"lease_s={config.lease_s} must exceed transfer_deadline_s="
                          f"{config.transfer_deadline_s}, or blocks could be freed mid-transfer")
    return config


def _mode(extra: dict[str, Any]) -> TransferMode:
    value = str(extra.get("mode", "read")).lower()
    try:
        return TransferMode(value)
    except ValueError:
        raise ConfigError(f"mode={value!r}: expected one of {[m.value for m in TransferMode]}") from None


def _flag(extra: dict[str, Any], key: str) -> bool:
    value = extra.get(key, False)
    if isinstance(value, str):
        value = value.strip().lower()
        if value not in ("true", "false", "1", "0", ""):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value in ("true", "1")
    return bool(value)


def _number(extra: dict[str, Any], key: str, default: float, *, lo: float,
            hi: float = float("inf"), kind: type = float) -> Any:
    raw = extra.get(key, default)
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={raw!r}: expected a {kind.__name__}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{key}={value}: outside [{lo}, {hi}]")
    return value


def _keys(extra: dict[str, Any], role: ConnectorRole) -> KeyConfig:
    """CURVE material: a key pair always; producers need an allow-list, consumers the server key."""
    hint = "(create keys with `kvxfer keys generate`, or set insecure_plaintext on loopback)"
    own = _own_pair(extra, hint)
    if role is ConnectorRole.PRODUCER:
        allowed = _allowed(extra)
        if not allowed:
            raise ConfigError(f"curve_allowed_keys / curve_allowed_keys_dir: a kv_producer needs the "
                              f"consumers' public keys {hint}")
        return KeyConfig(own=own, allowed_client_keys=allowed)
    server = _server_key(extra)
    if server is None:
        raise ConfigError(f"curve_server_key / curve_server_key_file: a kv_consumer needs the "
                          f"producers' public key {hint}")
    return KeyConfig(own=own, server_public_key=server)


def _own_pair(extra: dict[str, Any], hint: str) -> KeyPair:
    if extra.get("curve_secret_key_file"):
        return load_keypair(Path(str(extra["curve_secret_key_file"])))
    if extra.get("curve_secret_key"):
        return KeyPair.from_secret(str(extra["curve_secret_key"]), what="curve_secret_key")
    raise ConfigError(f"curve_secret_key / curve_secret_key_file: CURVE is on and no key pair is set {hint}")


def _allowed(extra: dict[str, Any]) -> frozenset[bytes]:
    if extra.get("curve_allowed_keys_dir"):
        return load_allowed_keys([Path(str(extra["curve_allowed_keys_dir"]))])
    raw = extra.get("curve_allowed_keys", ())
    items = raw.replace(",", " ").split() if isinstance(raw, str) else list(raw)
    return frozenset(parse_key(k, what=f"curve_allowed_keys[{i}]") for i, k in enumerate(items))


def _server_key(extra: dict[str, Any]) -> bytes | None:
    if extra.get("curve_server_key_file"):
        return load_public_key(Path(str(extra["curve_server_key_file"])))
    if extra.get("curve_server_key"):
        return parse_key(str(extra["curve_server_key"]), what="curve_server_key")
    return None


def model_fingerprint(architecture: str, fields: dict[str, object]) -> str:
    """A short name of what makes two caches interchangeable: the architecture and the shape of its
    attention (not the path, not the weights). Readable prefix, hash of every field."""
    digest = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:12]
    return f"{architecture}-{digest}"
