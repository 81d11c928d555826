"""The side-channel keys of `kvxfer serve`: where they come from (key files, or key material in
the environment) and reading them once at daemon start.

Key material has environment variables and no flags on purpose: keys on a command line are
visible to every local user.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from kvxfer.agents.messages import Role
from kvxfer.daemons.enums import ModeChoice
from kvxfer.daemons.resolve import Resolver, env_var
from kvxfer.daemons.settings import CurveConfig
from kvxfer.errors import ConfigError

if TYPE_CHECKING:  # importing the agents layer pulls in pyzmq; load_curve_keys imports it lazily
    from kvxfer.agents.keys import KeyConfig

# Z85 text, 40 characters each.
CURVE_KEY_ENV_VARS = (
    "KVXFER_CURVE_SECRET_KEY",
    "KVXFER_CURVE_PUBLIC_KEY",
    "KVXFER_CURVE_SERVER_KEY",
    "KVXFER_CURVE_ALLOWED_KEYS",  # comma-separated public keys
)
_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_HINT = "(create keys with `kvxfer keys generate`, or pass --insecure-plaintext on loopback)"


def curve_config(s: Resolver, role: Role, mode: ModeChoice) -> CurveConfig:
    """Keys of an authenticated side channel. Every service listens (its own key pair plus an
    allow-list of clients); decode always connects to prefill, prefill connects to decode only when
    it may push (write or auto), and a connecting service needs its peers' public key."""
    secret_file, secret = _key_source(s, "--curve-secret-key-file", "KVXFER_CURVE_SECRET_KEY")
    public_file, public = _key_source(s, "--curve-public-key-file", "KVXFER_CURVE_PUBLIC_KEY")
    server_file, server = _key_source(s, "--curve-server-key-file", "KVXFER_CURVE_SERVER_KEY")
    allowed_dir = s.path("--curve-allowed-keys-dir")
    curve = CurveConfig(
        secret_key_file=secret_file,
        secret_key=secret,
        public_key_file=public_file,
        public_key=public,
        server_key_file=server_file,
        server_key=server,
        allowed_keys_dir=allowed_dir,
        allowed_keys=() if allowed_dir is not None else _allowed_keys(s),
    )
    _check_complete(curve, role, mode)
    return curve


def _check_complete(curve: CurveConfig, role: Role, mode: ModeChoice) -> None:
    if curve.secret_key_file is None and curve.secret_key is None:
        raise ConfigError(f"CURVE is on and no key pair is set: give --curve-secret-key-file or KVXFER_CURVE_SECRET_KEY {_HINT}")
    if curve.allowed_keys_dir is None and not curve.allowed_keys:
        raise ConfigError(f"CURVE is on and no client is allowed: give --curve-allowed-keys-dir or KVXFER_CURVE_ALLOWED_KEYS {_HINT}")
    connects = role is Role.DECODE or mode is not ModeChoice.READ
    if connects and curve.server_key_file is None and curve.server_key is None:
        raise ConfigError(f"CURVE is on and the {role.value} service connects to peers (--mode {mode.value}): give --curve-server-key-file or KVXFER_CURVE_SERVER_KEY {_HINT}")


def _key_source(s: Resolver, flag: str, key_var: str) -> tuple[Path | None, str | None]:
    """A key file (flag or its variable) wins over key material in `key_var`."""
    file = s.path(flag)
    if file is not None:
        return file, None
    key = s.environ.get(key_var, "").strip() or None
    if key is not None and not _Z85.fullmatch(key):
        raise ConfigError(f"{key_var} (for {flag}): not a 40-character Z85 key ({len(key)} characters)")
    return None, key


def _allowed_keys(s: Resolver) -> tuple[str, ...]:
    keys = tuple(k for k in re.split(r"[,\s]+", s.environ.get("KVXFER_CURVE_ALLOWED_KEYS", "")) if k)
    for index, key in enumerate(keys):
        if not _Z85.fullmatch(key):
            raise ConfigError(f"KVXFER_CURVE_ALLOWED_KEYS item {index}: not a 40-character Z85 public key ({len(key)} characters)")
    return keys


def load_curve_keys(curve: CurveConfig) -> KeyConfig:
    """Read the key material `curve` points at, once, at daemon start (kvxfer.agents.keys does the
    reading and checks file modes). The public-key settings, when given, must match the secret."""
    from kvxfer.agents import keys

    if curve.secret_key_file is not None:
        own = keys.load_keypair(curve.secret_key_file)
    else:
        own = keys.KeyPair.from_secret(curve.secret_key or "", what="KVXFER_CURVE_SECRET_KEY")
    public = _public_key(curve.public_key_file, curve.public_key, "--curve-public-key-file")
    if public is not None and public != own.public:
        raise ConfigError("--curve-public-key-file / KVXFER_CURVE_PUBLIC_KEY: not the public key of the secret key")
    allowed = frozenset(keys.parse_key(k, what="KVXFER_CURVE_ALLOWED_KEYS") for k in curve.allowed_keys)
    if curve.allowed_keys_dir is not None:
        allowed = keys.load_allowed_keys([curve.allowed_keys_dir])
        if not allowed:
            raise ConfigError(f"--curve-allowed-keys-dir={str(curve.allowed_keys_dir)!r}: no *.key files, so no client could connect")
    return keys.KeyConfig(
        own=own,
        server_public_key=_public_key(curve.server_key_file, curve.server_key, "--curve-server-key-file"),
        allowed_client_keys=allowed,
    )


def _public_key(path: Path | None, text: str | None, flag: str) -> bytes | None:
    from kvxfer.agents import keys

    if path is not None:
        return keys.load_public_key(path)
    return None if text is None else keys.parse_key(text, what=env_var(flag).removesuffix("_FILE"))
