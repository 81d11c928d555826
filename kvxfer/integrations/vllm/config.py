"""The connector's settings: `kv_connector_extra_config` parsed once into a typed, validated
dataclass, plus the checks that refuse vLLM setups the connector does not support.

Only this module reads vLLM's config objects for settings; everything else takes `ConnectorConfig`.
Keys of `kv_connector_extra_config` (all optional unless said):

| key | meaning | default |
| --- | --- | --- |
| `side_channel_host` | where a producer's side channel listens | this host's address (its hostname's) |
| `side_channel_port` | producer: TP rank r listens on port + r | 5700 |
| `advertise_host` | the host consumers dial (when listening on a wildcard) | side_channel_host |
| `mode` | `read` (consumer pulls), `write` (producer pushes) or `auto` (the cost model per producer) | `auto` |
| `transfer_path` | `auto` (the cost model), `direct` (zero-copy descriptors) or `staged` (a WRITE gathered into one descriptor) | `auto` |
| `staging_mib` | registered staging slots on each rank's cache device: staged transfers and the probes that calibrate the cost model (0: neither; the choice is then a rule) | 0 on CPU, 128 on CUDA |
| `lease_s` | producer holds a request's blocks at most this long without a renewal | 30 |
| `transfer_deadline_s` | slack of each transfer's deadline (plus bytes / expected_gbps) | 5 |
| `expected_gbps` | pessimistic bandwidth for deadlines | 0.5 |
| `handshake_timeout_s` | side-channel calls | 10 |
| `curve_secret_key` / `curve_secret_key_file` | this instance's CURVE key pair (strict mode) | made per instance |
| `curve_server_key` / `curve_server_key_file` | consumer: pin the producers' public key (strict) | from each request |
| `curve_allowed_keys` / `curve_allowed_keys_dir` | producer: admit only these consumers (strict) | any consumer |
| `insecure_plaintext` | no CURVE at all (loopback only, for experiments) | false |
| `model_fingerprint` | overrides the fingerprint derived from the model's shape | - |
| `nixl_progress_thread` | NIXL's own progress thread instead of polling | false |

With no keys at all (the drop-in mode) the side channel is still CURVE-encrypted and the producer
still authenticated: each producer instance makes its key pair at start (`instance_keypair`, one
file its processes share), its public key travels in `kv_transfer_params`, and it admits any
consumer that presents signed parameters. Pre-shared keys pin both sides (the strict mode).
Threat model of each: docs/security.md.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from kvxfer.agents.capability import Signer, master_secret
from kvxfer.agents.keys import (
    KeyConfig,
    KeyPair,
    generate_keypair,
    instance_keypair,
    load_allowed_keys,
    load_keypair,
    load_public_key,
    parse_key,
)
from kvxfer.agents.transfer_choice import ModeChoice, TransferPathChoice
from kvxfer.daemons.checks import WILDCARD_HOSTS
from kvxfer.daemons.config import is_loopback
from kvxfer.deadline import Deadline
from kvxfer.errors import ConfigError

_KNOWN_KEYS = frozenset({
    "side_channel_host", "side_channel_port", "advertise_host", "mode", "transfer_path", "staging_mib", "lease_s",
    "transfer_deadline_s", "expected_gbps", "handshake_timeout_s", "curve_secret_key",
    "curve_secret_key_file", "curve_server_key", "curve_server_key_file", "curve_allowed_keys",
    "curve_allowed_keys_dir", "insecure_plaintext", "model_fingerprint", "nixl_progress_thread",
})
_DEADLINE = Deadline()  # transfer_deadline_s and expected_gbps default to its fields
DEFAULT_SIDE_CHANNEL_PORT = 5700  # vLLM's own NixlConnector defaults to 5600
# Staging per rank, by cache device. On CPU a staged copy costs more than the descriptors it saves
# (as for the daemons); on CUDA 128 MiB holds the staged pushes of ordinary requests (KiB to a few
# MiB per rank) outside vLLM's own memory budget, which gpu_memory_utilization does not count.
STAGING_MIB = {"cpu": 0, "cuda": 128}
C = TypeVar("C", ModeChoice, TransferPathChoice)
INSTANCE_KEY_DIR = Path(tempfile.gettempdir()) / f"kvxfer-{os.getuid()}"  # 0700: instance key pairs


class ConnectorRole(Enum):
    PRODUCER = "kv_producer"  # prefill: computes KV, holds it under leases, serves it
    CONSUMER = "kv_consumer"  # decode: loads KV the producer computed


@dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
    role: ConnectorRole
    engine_id: str
    mode: ModeChoice = ModeChoice.AUTO
    transfer_path: TransferPathChoice = TransferPathChoice.AUTO
    staging_mib: int | None = None  # None: STAGING_MIB's figure for the cache's device
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = DEFAULT_SIDE_CHANNEL_PORT
    advertise_host: str = "127.0.0.1"
    lease_s: float = 30.0
    transfer_deadline_s: float = _DEADLINE.slack_s
    expected_gbps: float = _DEADLINE.expected_gbps
    handshake_timeout_s: float = 10.0
    keys: KeyConfig | None = None  # None exactly when insecure
    insecure: bool = False
    model_fingerprint: str = ""
    nixl_progress_thread: bool = False

    def staging_bytes(self, device_type: str) -> int:
        mib = self.staging_mib if self.staging_mib is not None else STAGING_MIB.get(device_type, 0)
        return mib << 20

    def side_channel_address(self, rank: int) -> str:
        return f"tcp://{self.advertise_host}:{self.side_channel_port + rank}"

    @property
    def producer_key(self) -> str:
        """The public key consumers learn from `kv_transfer_params` (drop-in mode), else ""."""
        keys = self.keys
        return keys.own.public.decode() if keys is not None and keys.admit_any_client else ""

    @property
    def grants_unbound(self) -> bool:
        """Requests bound to no consumer are usable (insecure, or any consumer admitted)."""
        return self.keys is None or self.keys.admit_any_client


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
    host = str(extra.get("side_channel_host") or this_host())
    advertise = str(extra.get("advertise_host", host))
    if advertise in WILDCARD_HOSTS:
        raise ConfigError(f"advertise_host={advertise!r}: consumers cannot dial a wildcard; set "
                          f"advertise_host to this machine's address")
    port = _number(extra, "side_channel_port", DEFAULT_SIDE_CHANNEL_PORT, lo=1, hi=65535, kind=int)
    if insecure and not is_loopback(host):
        raise ConfigError(f"insecure_plaintext: only on loopback, but side_channel_host={host!r}; "
                          f"use CURVE keys")
    config = ConnectorConfig(
        role=connector_role,
        engine_id=engine_id,
        mode=_choice(extra, "mode", ModeChoice),
        transfer_path=_choice(extra, "transfer_path", TransferPathChoice),
        staging_mib=_number(extra, "staging_mib", 0, lo=0, hi=1 << 20, kind=int) if "staging_mib" in extra else None,
        side_channel_host=host,
        side_channel_port=port,
        advertise_host=advertise,
        lease_s=_number(extra, "lease_s", 30.0, lo=0.1),
        transfer_deadline_s=_number(extra, "transfer_deadline_s", _DEADLINE.slack_s, lo=0.01),
        expected_gbps=_number(extra, "expected_gbps", _DEADLINE.expected_gbps, lo=1e-6),
        handshake_timeout_s=_number(extra, "handshake_timeout_s", 10.0, lo=0.01),
        keys=None if insecure else _keys(extra, connector_role, engine_id),
        insecure=insecure,
        model_fingerprint=str(extra.get("model_fingerprint") or default_fingerprint),
        nixl_progress_thread=_flag(extra, "nixl_progress_thread"),
    )
    if config.lease_s <= config.transfer_deadline_s:
        raise ConfigError(f"lease_s={config.lease_s} must exceed transfer_deadline_s="
                          f"{config.transfer_deadline_s}, or blocks could be freed mid-transfer")
    return config


def _choice(extra: dict[str, Any], key: str, enum: type[C]) -> C:
    value = str(extra.get(key, "auto")).lower()
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: expected one of {[c.value for c in enum]}") from None


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


def _keys(extra: dict[str, Any], role: ConnectorRole, engine_id: str) -> KeyConfig:
    """CURVE material. Strict: pre-shared keys (a producer's allow-list, a consumer's pinned
    producer key). Drop-in: a producer's own pair made per instance, any consumer admitted; a
    consumer's pair made per process, the producer's key taken from each request."""
    own = _own_pair(extra)
    if role is ConnectorRole.PRODUCER:
        allowed = _allowed(extra)
        pair = own or instance_keypair(INSTANCE_KEY_DIR, _key_name(engine_id))
        return KeyConfig(own=pair, allowed_client_keys=allowed, admit_any_client=not allowed)
    server = _server_key(extra)
    if server is not None and own is None:
        raise ConfigError("curve_server_key: pinning the producers' key is the strict mode, which needs this "
                          "consumer's key pair on their allow-list too: give curve_secret_key or "
                          "curve_secret_key_file (create keys with `kvxfer keys generate`)")
    return KeyConfig(own=own or generate_keypair(), server_public_key=server)


def _key_name(engine_id: str) -> str:
    """A file name for the instance's key from vLLM's engine id (a uuid unless set)."""
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in engine_id)[:48]
    return f"producer-{safe}-{hashlib.sha256(engine_id.encode()).hexdigest()[:8]}"


def this_host() -> str:
    """The address this host's name resolves to: a pod's IP on Kubernetes; set
    `side_channel_host` where consumers reach the host by another address."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _own_pair(extra: dict[str, Any]) -> KeyPair | None:
    if extra.get("curve_secret_key_file"):
        return load_keypair(Path(str(extra["curve_secret_key_file"])))
    if extra.get("curve_secret_key"):
        return KeyPair.from_secret(str(extra["curve_secret_key"]), what="curve_secret_key")
    return None


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


def signer_of(config: ConnectorConfig, boot_epoch: int) -> Signer:
    """The producer instance's signer: its scheduler signs parameters, its workers hand out the
    keys that check them, each deriving the same secret (kvxfer.agents.capability)."""
    secret = config.keys.own.secret if config.keys is not None else None
    return Signer(master_secret(secret, engine_id=config.engine_id, boot_epoch=boot_epoch))
