"""CURVE keys for the side channel: typed key material, generation, and key files.

Keys are Z85 text (40 characters, as ZeroMQ prints them). A key pair lives in two files:
`NAME.key` (the public key, one line, shareable) and `NAME.key_secret` (the secret key, one line,
mode 0600; its public key is derived from it). ZeroMQ certificate files written by
`zmq.auth.create_certificates` are read as well.

This module never reads environment variables (only the CLI does: `kvxfer.commands.keys`) and
never logs or formats a secret key: `KeyPair`'s repr shows the public key only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

from kvxfer.errors import ConfigError

Z85_KEY_LEN = 40
_Z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


def parse_key(text: str | bytes, *, what: str) -> bytes:
    """A Z85 CURVE key as 40 ASCII bytes, or ConfigError naming `what` (never the value)."""
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    raw = raw.strip()
    if not _Z85.match(raw):
        raise ConfigError(f"{what}: not a Z85 CURVE key (expected {Z85_KEY_LEN} Z85 characters)")
    return raw.encode("ascii")


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes = field(repr=False)  # Z85, 40 bytes; never printed

    @classmethod
    def from_secret(cls, secret: str | bytes, *, what: str = "secret key") -> KeyPair:
        key = parse_key(secret, what=what)
        return cls(public=zmq.curve_public(key), secret=key)

    def __post_init__(self) -> None:
        parse_key(self.public, what="public key")
        parse_key(self.secret, what="secret key")
        if zmq.curve_public(self.secret) != self.public:
            raise ConfigError("key pair: the public key does not belong to the secret key")


def generate_keypair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public=public, secret=secret)


@dataclass(frozen=True)
class KeyConfig:
    """Key material of one side-channel endpoint.

    A server needs `own` and `allowed_client_keys` (an empty allow-list refuses every client), or
    `admit_any_client`: then every client is admitted, still encrypted and still authenticated as
    a key, and what it may do is decided by capabilities it presents (the drop-in mode of the vLLM
    connector; docs/security.md). A client needs `own` (its public key must be allowed by the
    server) and `server_public_key`.
    """

    own: KeyPair
    server_public_key: bytes | None = None
    allowed_client_keys: frozenset[bytes] = frozenset()
    admit_any_client: bool = False

    def __post_init__(self) -> None:
        if self.server_public_key is not None:
            parse_key(self.server_public_key, what="server public key")
        for i, key in enumerate(self.allowed_client_keys):
            parse_key(key, what=f"allowed client key #{i}")

    def __repr__(self) -> str:
        return (
            f"KeyConfig(public={self.own.public.decode()}, server_public_key="
            f"{self.server_public_key.decode() if self.server_public_key else None}, "
            f"num_allowed_client_keys={len(self.allowed_client_keys)}, admit_any_client={self.admit_any_client})"
        )


def _write_private(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # the umask may have narrowed or the file system widened it


def write_keypair(pair: KeyPair, directory: Path, name: str) -> tuple[Path, Path]:
    """Write `NAME.key` and `NAME.key_secret`, both readable by the owner only (0600; share the
    public key deliberately). Refuses to overwrite. Returns (public path, secret path)."""
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name) or name.startswith("."):
        raise ConfigError(f"key name {name!r}: use 1-64 of [A-Za-z0-9_.-], not starting with '.'")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    secret_path = directory / f"{name}{SECRET_SUFFIX}"
    for path in (public_path, secret_path):
        if path.exists():
            raise ConfigError(f"{path} exists; refusing to overwrite a key")
    _write_private(secret_path, pair.secret.decode() + "\n", 0o600)
    _write_private(public_path, pair.public.decode() + "\n", 0o600)
    return public_path, secret_path


def _read_text(path: Path, *, what: str) -> str:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what}: cannot read {path}: {type(err).__name__}") from None


def _read_zmq_certificate(path: Path, *, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what}: {path} is neither a Z85 key nor a ZeroMQ certificate") from err
    return parse_key(public, what=what), None if secret is None else parse_key(secret, what=what)


def load_public_key(path: Path) -> bytes:
    """A public key from a `NAME.key` file (one Z85 line) or a ZeroMQ certificate."""
    what = f"public key file {path}"
    text = _read_text(path, what=what)
    if len(text.strip()) == Z85_KEY_LEN:
        return parse_key(text, what=what)
    return _read_zmq_certificate(path, what=what)[0]


def load_keypair(secret_path: Path) -> KeyPair:
    """A key pair from a `NAME.key_secret` file (one Z85 line) or a ZeroMQ secret certificate.
    Refuses a secret file that group or others can read."""
    what = f"secret key file {secret_path}"
    try:
        mode = secret_path.stat().st_mode
    except OSError as err:
        raise ConfigError(f"{what}: cannot read: {type(err).__name__}") from None
    if mode & 0o077:
        raise ConfigError(f"{what}: mode {oct(mode & 0o777)} lets others read it; chmod 600 it")
    text = _read_text(secret_path, what=what)
    if len(text.strip()) == Z85_KEY_LEN:
        return KeyPair.from_secret(text, what=what)
    _, secret = _read_zmq_certificate(secret_path, what=what)
    if secret is None:
        raise ConfigError(f"{what}: the certificate holds no secret key")
    return KeyPair.from_secret(secret, what=what)


def load_allowed_keys(paths: Iterable[Path]) -> frozenset[bytes]:
    """Public keys from files, or from every `*.key` file of a directory."""
    keys: set[bytes] = set()
    for path in paths:
        files = sorted(path.glob(f"*{PUBLIC_SUFFIX}")) if path.is_dir() else [path]
        keys.update(load_public_key(p) for p in files)
    return frozenset(keys)


def instance_keypair(directory: Path, name: str) -> KeyPair:
    """The key pair every process of one instance shares, made by whichever comes first: written
    to a private file of this process, then linked to `NAME.key_secret` (a link fails if another
    process won; its pair is then read). Nothing secret leaves the machine or the user."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(f"{directory}: must be owned by this user with mode 0700 to hold instance keys")
    final = directory / f"{name}{SECRET_SUFFIX}"
    if not final.exists():
        mine = directory / f".{name}.{os.getpid()}{SECRET_SUFFIX}"
        _write_private(mine, generate_keypair().secret.decode() + "\n", 0o600)
        try:
            os.link(mine, final)
        except FileExistsError:
            pass
        finally:
            mine.unlink()
    return load_keypair(final)
