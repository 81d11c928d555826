"""Typed configuration of `kvxfer serve prefill|decode` and `kvxfer proxy`.

The contract between the CLI, the daemons and the manifests in `deploy/`. Every flag `--some-flag`
falls back to the environment variable `KVXFER_SOME_FLAG`, then to its default (flag > env >
default); an empty variable counts as unset. Parsing and validation happen here, once, and fail
with a `ConfigError` that names the flag (and the variable, when the value came from one) and the
value. The daemons receive frozen `ServeConfig` / `ProxyConfig` objects and never read flags or
the environment themselves.

Usage from a command module:

    parser = subparsers.add_parser("serve", help=...)
    add_serve_arguments(parser)
    ...
    config = serve_config_from_args(args)
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from kvxfer.errors import ConfigError
from kvxfer.layouts import LAYOUTS

if TYPE_CHECKING:  # importing the agents layer pulls in pyzmq; load_curve_keys imports it lazily
    from kvxfer.agents.keys import KeyConfig

ENV_PREFIX = "KVXFER_"
# Key material may come from the environment instead of files (Z85 text, 40 characters). These
# variables have no flag on purpose: keys on a command line are visible to every local user.
CURVE_KEY_ENV_VARS = (
    "KVXFER_CURVE_SECRET_KEY",
    "KVXFER_CURVE_PUBLIC_KEY",
    "KVXFER_CURVE_SERVER_KEY",
    "KVXFER_CURVE_ALLOWED_KEYS",  # comma-separated public keys
)
MODEL_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_HTTP_PORT = {"prefill": 8100, "decode": 8200, "proxy": 8000}
DEFAULT_SIDE_CHANNEL_PORT = {"prefill": 5600, "decode": 5700}
DEFAULT_NUM_BLOCKS_CPU = 1024
DEFAULT_MEMORY_FRACTION_CUDA = 0.9
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Role(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


class Mode(str, Enum):
    READ = "read"  # decode pulls from prefill's cache
    WRITE = "write"  # prefill pushes into blocks decode allocated first
    AUTO = "auto"  # the faster of the two, measured at handshake


class TransferPath(str, Enum):
    AUTO = "auto"  # the cost model's pick (calibrated against each producer at handshake)
    DIRECT = "direct"  # one NIXL descriptor per span, zero-copy
    STAGED = "staged"  # gather, one descriptor, scatter (a WRITE; needs staging slots on both sides)


class RetryPolicy(str, Enum):
    RETRY_ONCE = "retry-once"
    FAIL = "fail"


@dataclass(frozen=True, kw_only=True)
class CurveConfig:
    """Where this daemon's side-channel keys come from. Files win over key material from the
    environment; the daemon (agents layer) reads the files. Secrets never appear in repr."""

    secret_key_file: Path | None = None
    secret_key: str | None = field(default=None, repr=False)
    public_key_file: Path | None = None
    public_key: str | None = None
    server_key_file: Path | None = None
    server_key: str | None = None
    allowed_keys_dir: Path | None = None
    allowed_keys: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    role: Role
    model_dir: Path | None  # exactly one of model_dir and preset is set
    preset: str | None
    seed: int
    tp: int
    layout: str
    block_size: int
    num_blocks: int | None  # exactly one of num_blocks and memory_fraction is set
    memory_fraction: float | None
    device: Device
    dtype: str
    host: str
    port: int
    side_channel_host: str
    side_channel_port: int  # rank r listens on side_channel_port + r
    advertise_host: str
    insecure_plaintext: bool
    curve: CurveConfig | None  # None exactly when insecure_plaintext
    mode: Mode
    transfer_deadline_s: float  # slack added to bytes / expected bandwidth
    expected_gbps: float
    lease_s: float
    engine_id: str
    nixl_threads: bool
    warmup: bool
    staging_mib: int = 0  # staging slots in all (0: no staged transfers; calibration still runs)
    staging_slots: int = 2
    transfer_path: TransferPath = TransferPath.AUTO

    @property
    def side_channel_ports(self) -> tuple[int, ...]:
        return tuple(self.side_channel_port + rank for rank in range(self.tp))

    def deadline_s(self, num_bytes: int) -> float:
        """Seconds a transfer of `num_bytes` may take before it fails with TransferTimeout."""
        return self.transfer_deadline_s + num_bytes / (self.expected_gbps * 1e9)


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    prefill_urls: tuple[str, ...]
    decode_urls: tuple[str, ...]
    host: str
    port: int
    request_timeout_s: float
    retry_policy: RetryPolicy


def env_var(flag: str) -> str:
    """`--side-channel-port` -> `KVXFER_SIDE_CHANNEL_PORT`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _add(parser: argparse.ArgumentParser, flag: str, help: str, **kwargs: object) -> None:
    """Add `flag` with default None (so a missing flag can fall back to its variable) and say
    which variable that is in the help text."""
    parser.add_argument(flag, default=None, help=f"{help} [env {env_var(flag)}]", **kwargs)  # type: ignore[arg-type]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvxfer serve`: the role, then every option of a prefill or decode service."""
    parser.add_argument("role", choices=[r.value for r in Role], help="which pool this service is in")
    parser.epilog = (
        "Every option falls back to the environment variable shown, then to its default. "
        "Rank r of the TP group listens on side-channel port BASE+r."
    )
    g = parser.add_argument_group("model")
    _add(g, "--model", "Hugging Face model directory (config.json + safetensors)", metavar="DIR")
    _add(g, "--preset", "random-weight model preset of kvxfer.engine, e.g. 'tiny' (instead of --model)", metavar="NAME")
    _add(g, "--seed", "seed of the random weights of --preset (default: 0)", metavar="N")
    _add(g, "--dtype", f"model and cache dtype, one of {', '.join(MODEL_DTYPES)} (default: bfloat16 on cuda, float32 on cpu)", metavar="DTYPE")
    g = parser.add_argument_group("parallelism and cache")
    _add(g, "--tp", "tensor-parallel size: ranks of this group, one process each, all in this service (default: 1)", metavar="N")
    _add(g, "--layout", f"KV cache layout, one of {', '.join(LAYOUTS)} (default: flashinfer-hnd)", metavar="NAME")
    _add(g, "--block-size", "tokens per cache block (default: 16)", metavar="N")
    _add(g, "--num-blocks", f"cache blocks per rank (default on cpu: {DEFAULT_NUM_BLOCKS_CPU})", metavar="N")
    _add(g, "--memory-fraction", f"fraction of free GPU memory for the cache, instead of --num-blocks (default on cuda: {DEFAULT_MEMORY_FRACTION_CUDA})", metavar="F")
    _add(g, "--device", "cpu or cuda; on cuda rank r uses GPU r (default: cpu)", metavar="DEVICE")
    g = parser.add_argument_group("network")
    _add(g, "--host", "HTTP bind address (default: 127.0.0.1)", metavar="ADDR")
    _add(g, "--port", "HTTP port of rank 0: /v1/completions, /health, /ready, /metrics (default: 8100 prefill, 8200 decode)", metavar="PORT")
    _add(g, "--side-channel-host", "side-channel bind address; 0.0.0.0 only if given (default: 127.0.0.1)", metavar="ADDR")
    _add(g, "--side-channel-port", "side-channel base port; rank r listens on BASE+r (default: 5600 prefill, 5700 decode)", metavar="BASE")
    _add(g, "--advertise-host", "address peers use to reach the side channel (default: --side-channel-host; required if that is a wildcard)", metavar="ADDR")
    g = parser.add_argument_group("side-channel security (ZMQ CURVE, on unless --insecure-plaintext)")
    _add(g, "--curve-secret-key-file", "this service's key pair (`kvxfer keys generate` NAME.key_secret); the key itself may be in KVXFER_CURVE_SECRET_KEY", metavar="FILE")
    _add(g, "--curve-public-key-file", "this service's public key (NAME.key; default: derived from the secret key); or KVXFER_CURVE_PUBLIC_KEY", metavar="FILE")
    _add(g, "--curve-server-key-file", "public key of the peers whose side channels this service connects to (the other pool); or KVXFER_CURVE_SERVER_KEY", metavar="FILE")
    _add(g, "--curve-allowed-keys-dir", "directory of public keys (*.key) allowed to connect to this service; or KVXFER_CURVE_ALLOWED_KEYS (comma-separated)", metavar="DIR")
    _add(g, "--insecure-plaintext", "no authentication or encryption on the side channel; loopback only, for local experiments", action="store_const", const=True)
    g = parser.add_argument_group("transfers")
    _add(g, "--mode", "read (decode pulls), write (prefill pushes) or auto (faster one, measured at handshake) (default: auto)", metavar="MODE")
    _add(g, "--transfer-deadline-s", "deadline slack in seconds; deadline = slack + bytes / expected bandwidth (default: 5)", metavar="S")
    _add(g, "--expected-gbps", "bandwidth in GB/s (gigabytes) assumed for the deadline (default: 1)", metavar="GBPS")
    _add(g, "--lease-s", "seconds prefill keeps a request's blocks for decode, renewed by decode heartbeats (default: 30)", metavar="S")
    _add(g, "--engine-id", "this service's id in transfer parameters and handshakes (default: random)", metavar="ID")
    _add(g, "--nixl-threads", "on: NIXL progress threads (each busy-polls a core); off: the service polls (default: off)", metavar="on|off")
    _add(g, "--warmup", "compile and run attention kernels before /ready turns 200 (default: on)", action=argparse.BooleanOptionalAction)
    _add(g, "--staging-mib", "MiB of registered staging slots for staged transfers (gather, one descriptor, scatter); a request larger than one slot moves directly; 0: none (default: 1024 on cuda, 0 on cpu, where staging loses)", metavar="MIB")
    _add(g, "--staging-slots", "how many requests may stage at once; each slot is staging-mib / slots (default: 2)", metavar="N")
    _add(g, "--transfer-path", "decode: auto (the cost model, calibrated against each prefill at handshake, picks), direct, or staged (WRITE; falls back to direct, logged, when a request does not fit a slot) (default: auto)", metavar="PATH")


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvxfer proxy`, the OpenAI-compatible front door."""
    parser.epilog = "Every option falls back to the environment variable shown, then to its default."
    _add(parser, "--prefill", "prefill service URL(s); repeatable; the variable takes a comma-separated list", metavar="URL", nargs="+", action="extend")
    _add(parser, "--decode", "decode service URL(s); repeatable; the variable takes a comma-separated list", metavar="URL", nargs="+", action="extend")
    _add(parser, "--host", "HTTP bind address (default: 127.0.0.1)", metavar="ADDR")
    _add(parser, "--port", "HTTP port: /v1/completions, /health, /ready, /metrics (default: 8000)", metavar="PORT")
    _add(parser, "--request-timeout-s", "seconds one request may take end to end before a 504 (default: 120)", metavar="S")
    _add(parser, "--retry-policy", "after a decode load failure: retry-once (through a fresh prefill) or fail (default: retry-once)", metavar="POLICY")


class _Settings:
    """Each setting's raw value and where it came from: the flag, else its variable, else None."""

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str]):
        self.args = args
        self.environ = environ
        self.env_ignored: set[str] = set()  # flags whose variable loses to a sibling's flag

    def raw(self, flag: str) -> tuple[object, str | None]:
        """(value, name of the variable it came from, or None when it came from the flag)."""
        value = getattr(self.args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            return value, None
        name = env_var(flag)
        if flag not in self.env_ignored and self.environ.get(name, "").strip():
            return self.environ[name], name
        return None, None

    def source(self, flag: str) -> str:
        """`--tp` or `KVXFER_TP (for --tp)`: where the setting came from, for error messages."""
        name = self.raw(flag)[1]
        return flag if name is None else f"{name} (for {flag})"

    def bad(self, flag: str, value: object, why: str) -> ConfigError:
        name = self.raw(flag)[1]
        where = f"{flag}={value!r}" if name is None else f"{name}={value!r} (for {flag})"
        return ConfigError(f"{where}: {why}")

    def given(self, flag: str) -> bool:
        return self.raw(flag)[0] is not None

    def exclusive(self, *flags: str) -> None:
        """At most one of `flags`; a flag on the command line silences its siblings' variables."""
        on_command_line = [f for f in flags if getattr(self.args, f.lstrip("-").replace("-", "_"), None) is not None]
        if on_command_line:
            self.env_ignored.update(set(flags) - set(on_command_line))
        chosen = [self.source(f) for f in flags if self.given(f)]
        if len(chosen) > 1:
            raise ConfigError(f"{' and '.join(chosen)} are mutually exclusive: give one")

    def text(self, flag: str, default: str | None = None) -> str | None:
        value, _ = self.raw(flag)
        return default if value is None else str(value).strip()

    def path(self, flag: str) -> Path | None:
        value = self.text(flag)
        return None if value is None else Path(value)

    def integer(self, flag: str, default: int | None, *, lo: int = 1, hi: int = 2**31) -> int | None:
        value, _ = self.raw(flag)
        if value is None:
            return default
        try:
            number = int(str(value))
        except ValueError:
            raise self.bad(flag, value, "not an integer") from None
        if not lo <= number <= hi:
            raise self.bad(flag, value, f"must be in [{lo}, {hi}]")
        return number

    def number(self, flag: str, default: float | None, *, lo: float = 0.0, hi: float = float("inf")) -> float | None:
        """A float in the open-below interval (lo, hi]."""
        value, _ = self.raw(flag)
        if value is None:
            return default
        try:
            number = float(str(value))
        except ValueError:
            raise self.bad(flag, value, "not a number") from None
        if not lo < number <= hi:
            raise self.bad(flag, value, f"must be in ({lo}, {hi}]")
        return number

    def choice(self, flag: str, choices: tuple[str, ...], default: str) -> str:
        value, _ = self.raw(flag)
        if value is None:
            return default
        if str(value) not in choices:
            raise self.bad(flag, value, f"must be one of {', '.join(choices)}")
        return str(value)

    def switch(self, flag: str, default: bool) -> bool:
        value, _ = self.raw(flag)
        if value is None or isinstance(value, bool):
            return default if value is None else value
        lowered = str(value).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise self.bad(flag, value, "must be one of 1, true, yes, on, 0, false, no, off")

    def items(self, flag: str) -> tuple[str, ...]:
        value, _ = self.raw(flag)
        if value is None:
            return ()
        if isinstance(value, list):
            return tuple(value)
        return tuple(part for part in re.split(r"[,\s]+", str(value)) if part)


def serve_config_from_args(args: argparse.Namespace, *, environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Build and validate a ServeConfig from parsed `kvxfer serve` arguments and `environ`
    (default: os.environ)."""
    s = _Settings(args, os.environ if environ is None else environ)
    role = Role(args.role)
    device = Device(s.choice("--device", tuple(d.value for d in Device), "cpu"))
    model_dir, preset = _model_source(s)
    num_blocks, memory_fraction = _cache_size(s, device)
    insecure = s.switch("--insecure-plaintext", False)
    side_host = s.text("--side-channel-host", "127.0.0.1")
    mode = Mode(s.choice("--mode", tuple(m.value for m in Mode), "auto"))
    config = ServeConfig(
        role=role,
        model_dir=model_dir,
        preset=preset,
        seed=s.integer("--seed", 0, lo=0),
        tp=s.integer("--tp", 1, hi=256),
        layout=s.choice("--layout", tuple(LAYOUTS), "flashinfer-hnd"),
        block_size=s.integer("--block-size", 16, hi=4096),
        num_blocks=num_blocks,
        memory_fraction=memory_fraction,
        device=device,
        dtype=s.choice("--dtype", MODEL_DTYPES, "bfloat16" if device is Device.CUDA else "float32"),
        host=s.text("--host", "127.0.0.1"),
        port=s.integer("--port", DEFAULT_HTTP_PORT[role.value], hi=65535),
        side_channel_host=side_host,
        side_channel_port=s.integer("--side-channel-port", DEFAULT_SIDE_CHANNEL_PORT[role.value], hi=65535),
        advertise_host=_advertise_host(s, side_host),
        insecure_plaintext=insecure,
        curve=None if insecure else _curve(s, role, mode),
        mode=mode,
        transfer_deadline_s=s.number("--transfer-deadline-s", 5.0),
        expected_gbps=s.number("--expected-gbps", 1.0),
        lease_s=s.number("--lease-s", 30.0),
        engine_id=_engine_id(s),
        nixl_threads=s.switch("--nixl-threads", False),
        warmup=s.switch("--warmup", True),
        staging_mib=s.integer("--staging-mib", 1024 if device.value == "cuda" else 0, lo=0, hi=1 << 20),
        staging_slots=s.integer("--staging-slots", 2, hi=1024),
        transfer_path=TransferPath(s.choice("--transfer-path", tuple(p.value for p in TransferPath), "auto")),
    )
    _check_serve(config, s)
    return config


def _model_source(s: _Settings) -> tuple[Path | None, str | None]:
    s.exclusive("--model", "--preset")
    model_dir, preset = s.path("--model"), s.text("--preset")
    if model_dir is None and preset is None:
        raise ConfigError(f"no model: give --model DIR or --preset NAME (or {env_var('--model')} / {env_var('--preset')})")
    if preset is not None and not _NAME.fullmatch(preset):
        raise s.bad("--preset", preset, "not a preset name (letters, digits, '.', '_', '-')")
    return model_dir, preset


def _cache_size(s: _Settings, device: Device) -> tuple[int | None, float | None]:
    s.exclusive("--num-blocks", "--memory-fraction")
    num_blocks = s.integer("--num-blocks", None)
    fraction = s.number("--memory-fraction", None, hi=1.0)
    if fraction is not None and device is Device.CPU:
        raise s.bad("--memory-fraction", fraction, "needs --device cuda; use --num-blocks on cpu")
    if num_blocks is None and fraction is None:
        if device is Device.CUDA:
            return None, DEFAULT_MEMORY_FRACTION_CUDA
        return DEFAULT_NUM_BLOCKS_CPU, None
    return num_blocks, fraction


def _advertise_host(s: _Settings, side_host: str) -> str:
    advertised = s.text("--advertise-host")
    if advertised is not None:
        if advertised in _WILDCARD_HOSTS:
            raise s.bad("--advertise-host", advertised, "peers cannot connect to a wildcard address")
        return advertised
    if side_host in _WILDCARD_HOSTS:
        raise s.bad("--side-channel-host", side_host, "a wildcard: give --advertise-host, the address peers use")
    return side_host


def _engine_id(s: _Settings) -> str:
    engine_id = s.text("--engine-id") or uuid.uuid4().hex
    if not _NAME.fullmatch(engine_id):
        raise s.bad("--engine-id", engine_id, "expected 1-64 letters, digits, '.', '_', '-'")
    return engine_id


def _curve(s: _Settings, role: Role, mode: Mode) -> CurveConfig:
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
    hint = "(create keys with `kvxfer keys generate`, or pass --insecure-plaintext on loopback)"
    if curve.secret_key_file is None and curve.secret_key is None:
        raise ConfigError(f"CURVE is on and no key pair is set: give --curve-secret-key-file or KVXFER_CURVE_SECRET_KEY {hint}")
    if curve.allowed_keys_dir is None and not curve.allowed_keys:
        raise ConfigError(f"CURVE is on and no client is allowed: give --curve-allowed-keys-dir or KVXFER_CURVE_ALLOWED_KEYS {hint}")
    connects = role is Role.DECODE or mode is not Mode.READ
    if connects and curve.server_key_file is None and curve.server_key is None:
        raise ConfigError(f"CURVE is on and the {role.value} service connects to peers (--mode {mode.value}): give --curve-server-key-file or KVXFER_CURVE_SERVER_KEY {hint}")
    return curve


def _key_source(s: _Settings, flag: str, key_var: str) -> tuple[Path | None, str | None]:
    """A key file (flag or its variable) wins over key material in `key_var`."""
    file = s.path(flag)
    if file is not None:
        return file, None
    key = s.environ.get(key_var, "").strip() or None
    if key is not None and not _Z85.fullmatch(key):
        raise ConfigError(f"{key_var} (for {flag}): not a 40-character Z85 key ({len(key)} characters)")
    return None, key


def _allowed_keys(s: _Settings) -> tuple[str, ...]:
    keys = tuple(k for k in re.split(r"[,\s]+", s.environ.get("KVXFER_CURVE_ALLOWED_KEYS", "")) if k)
    for index, key in enumerate(keys):
        if not _Z85.fullmatch(key):
            raise ConfigError(f"KVXFER_CURVE_ALLOWED_KEYS item {index}: not a 40-character Z85 public key ({len(key)} characters)")
    return keys


def _check_serve(config: ServeConfig, s: _Settings) -> None:
    """Checks that involve several settings."""
    last = config.side_channel_port + config.tp - 1
    if last > 65535:
        raise s.bad("--side-channel-port", config.side_channel_port, f"ranks 0..{config.tp - 1} need ports up to {last} > 65535")
    if config.port in config.side_channel_ports:
        raise s.bad("--port", config.port, f"collides with side-channel ports {config.side_channel_port}..{last}")
    if config.lease_s <= config.transfer_deadline_s:
        why = f"must exceed --transfer-deadline-s={config.transfer_deadline_s}, or blocks are freed while a transfer may still read them"
        raise s.bad("--lease-s", config.lease_s, why)
    if config.transfer_path is TransferPath.STAGED and (config.mode is Mode.READ or config.staging_mib == 0):
        why = "staged transfers are WRITEs into staging slots: use --mode write or auto and --staging-mib > 0"
        raise s.bad("--transfer-path", config.transfer_path.value, why)
    if config.insecure_plaintext and not is_loopback(config.side_channel_host):
        why = f"{s.source('--insecure-plaintext')} is for loopback only; use CURVE keys"
        raise s.bad("--side-channel-host", config.side_channel_host, why)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_config_from_args(args: argparse.Namespace, *, environ: Mapping[str, str] | None = None) -> ProxyConfig:
    """Build and validate a ProxyConfig from parsed `kvxfer proxy` arguments and `environ`
    (default: os.environ)."""
    s = _Settings(args, os.environ if environ is None else environ)
    return ProxyConfig(
        prefill_urls=_urls(s, "--prefill"),
        decode_urls=_urls(s, "--decode"),
        host=s.text("--host", "127.0.0.1"),
        port=s.integer("--port", DEFAULT_HTTP_PORT["proxy"], hi=65535),
        request_timeout_s=s.number("--request-timeout-s", 120.0),
        retry_policy=RetryPolicy(s.choice("--retry-policy", tuple(p.value for p in RetryPolicy), "retry-once")),
    )


def _urls(s: _Settings, flag: str) -> tuple[str, ...]:
    urls = tuple(url.rstrip("/") for url in s.items(flag))
    if not urls:
        raise ConfigError(f"no {flag} service: give {flag} URL (or {env_var(flag)}, comma-separated)")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
            raise s.bad(flag, url, "expected http(s)://HOST[:PORT]")
        try:
            parts.port  # noqa: B018 (raises on a malformed port)
        except ValueError:
            raise s.bad(flag, url, "bad port") from None
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{s.source(flag)}: a URL is listed twice in {list(urls)}")
    return urls


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
