"""The command line of `kvxfer serve prefill|decode` and `kvxfer proxy`: flags, their help, and
the typed configuration built from them.

The contract between the CLI, the daemons and the manifests in `deploy/`. Every flag `--some-flag`
falls back to the environment variable `KVXFER_SOME_FLAG`, then to its default (flag > env >
default; kvxfer.daemons.resolve). Defaults are written once, in kvxfer.daemons.settings; the help
text shows them from there. Parsing and validation happen here, once, and fail with a
`ConfigError` that names the flag (and the variable, when the value came from one) and the value.
The daemons receive frozen `ServeConfig` / `ProxyConfig` objects and never read flags or the
environment themselves.

Usage from a command module:

    parser = subparsers.add_parser("serve", help=...)
    add_serve_arguments(parser)
    ...
    config = serve_config_from_args(args)

Where the rest lives (and is re-exported from here): the settings dataclasses and their defaults
(settings), the enums (enums), flag > env > default (resolve), checks across settings (checks),
side-channel keys (curve), the transfer deadline (kvxfer.deadline).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from urllib.parse import urlsplit

from kvxfer.agents.messages import Role
from kvxfer.agents.sidechannel import rank_address
from kvxfer.daemons.checks import advertise_host, check_serve, is_loopback
from kvxfer.daemons.curve import CURVE_KEY_ENV_VARS, curve_config, load_curve_keys
from kvxfer.daemons.enums import Device, ModeChoice, RetryPolicy, TransferPathChoice, values
from kvxfer.daemons.resolve import ENV_PREFIX, Resolver, env_var
from kvxfer.daemons.settings import (
    DEVICE_DEFAULTS,
    MODEL_DTYPES,
    ROLE_DEFAULTS,
    CurveConfig,
    ProxyConfig,
    ServeConfig,
    random_engine_id,
)
from kvxfer.deadline import Deadline
from kvxfer.errors import ConfigError
from kvxfer.layouts import LAYOUTS

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DEADLINE = Deadline()
# A dataclass field's default is also its class attribute: `ServeConfig.tp` is tp's default.
S, P = ServeConfig, ProxyConfig


def _shown(value: object) -> str:
    """A default as a user types it."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _by_device(name: str) -> str:
    """`1024 on cuda, 0 on cpu`: a DEVICE_DEFAULTS field on each device that has one."""
    shown = [(device, getattr(d, name)) for device, d in DEVICE_DEFAULTS.items()]
    return ", ".join(f"{_shown(v)} on {device.value}" for device, v in reversed(shown) if v is not None)


def _by_role(name: str) -> str:
    return ", ".join(f"{_shown(getattr(d, name))} {role.value}" for role, d in ROLE_DEFAULTS.items())


def _add(parser: argparse._ActionsContainer, flag: str, help: str, default: object = None,
         **kwargs: object) -> None:
    """Add `flag` with default None (so a missing flag can fall back to its variable); its help
    shows `default` (a value, or already words) and names that variable."""
    shown = "" if default is None else f" (default: {_shown(default)})"
    parser.add_argument(flag, default=None, help=f"{help}{shown} [env {env_var(flag)}]", **kwargs)  # type: ignore[arg-type]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvxfer serve`: the role, then every option of a prefill or decode service."""
    parser.add_argument("role", choices=values(Role), help="which pool this service is in")
    parser.epilog = (
        "Every option falls back to the environment variable shown, then to its default. "
        "Rank r of the TP group listens on side-channel port BASE+r."
    )
    g = parser.add_argument_group("model")
    _add(g, "--model", "Hugging Face model directory (config.json + safetensors)", metavar="DIR")
    _add(g, "--preset", "random-weight model preset of kvxfer.engine, e.g. 'tiny' (instead of --model)", metavar="NAME")
    _add(g, "--seed", "seed of the random weights of --preset", S.seed, metavar="N")
    _add(g, "--dtype", f"model and cache dtype, one of {', '.join(MODEL_DTYPES)}", _by_device("dtype"), metavar="DTYPE")
    g = parser.add_argument_group("parallelism and cache")
    _add(g, "--tp", "tensor-parallel size: ranks of this group, one process each, all in this service", S.tp, metavar="N")
    _add(g, "--layout", f"KV cache layout, one of {', '.join(LAYOUTS)}", S.layout, metavar="NAME")
    _add(g, "--block-size", "tokens per cache block", S.block_size, metavar="N")
    _add(g, "--num-blocks", "cache blocks per rank", _by_device("num_blocks"), metavar="N")
    _add(g, "--memory-fraction", "fraction of free GPU memory for the cache, instead of --num-blocks", _by_device("memory_fraction"), metavar="F")
    _add(g, "--device", "cpu or cuda; on cuda rank r uses GPU r", S.device, metavar="DEVICE")
    g = parser.add_argument_group("network")
    _add(g, "--host", "HTTP bind address", S.host, metavar="ADDR")
    _add(g, "--port", "HTTP port of rank 0: /v1/completions, /health, /ready, /metrics", _by_role("port"), metavar="PORT")
    _add(g, "--side-channel-host", "side-channel bind address; 0.0.0.0 only if given", S.side_channel_host, metavar="ADDR")
    _add(g, "--side-channel-port", "side-channel base port; rank r listens on BASE+r", _by_role("side_channel_port"), metavar="BASE")
    _add(g, "--advertise-host", "address peers use to reach the side channel", "--side-channel-host; required if that is a wildcard", metavar="ADDR")
    g = parser.add_argument_group("side-channel security (ZMQ CURVE, on unless --insecure-plaintext)")
    _add(g, "--curve-secret-key-file", "this service's key pair (`kvxfer keys generate` NAME.key_secret); the key itself may be in KVXFER_CURVE_SECRET_KEY", metavar="FILE")
    _add(g, "--curve-public-key-file", "this service's public key (NAME.key); or KVXFER_CURVE_PUBLIC_KEY", "derived from the secret key", metavar="FILE")
    _add(g, "--curve-server-key-file", "public key of the peers whose side channels this service connects to (the other pool); or KVXFER_CURVE_SERVER_KEY", metavar="FILE")
    _add(g, "--curve-allowed-keys-dir", "directory of public keys (*.key) allowed to connect to this service; or KVXFER_CURVE_ALLOWED_KEYS (comma-separated)", metavar="DIR")
    _add(g, "--insecure-plaintext", "no authentication or encryption on the side channel; loopback only, for local experiments", action="store_const", const=True)
    g = parser.add_argument_group("transfers")
    _add(g, "--mode", "read (decode pulls), write (prefill pushes) or auto (faster one, measured at handshake)", S.mode, metavar="MODE")
    _add(g, "--transfer-deadline-s", "deadline slack in seconds; deadline = slack + bytes / expected bandwidth", _DEADLINE.slack_s, metavar="S")
    _add(g, "--expected-gbps", "bandwidth in GB/s (gigabytes) assumed for the deadline", _DEADLINE.expected_gbps, metavar="GBPS")
    _add(g, "--lease-s", "seconds prefill keeps a request's blocks for decode, renewed by decode heartbeats", S.lease_s, metavar="S")
    _add(g, "--engine-id", "this service's id in transfer parameters and handshakes", "random", metavar="ID")
    _add(g, "--nixl-threads", "on: NIXL progress threads (each busy-polls a core); off: the service polls", S.nixl_threads, metavar="on|off")
    _add(g, "--warmup", "compile and run attention kernels before /ready turns 200", S.warmup, action=argparse.BooleanOptionalAction)
    _add(g, "--kernel-cache", "directory of compiled kernels (Triton's staging copiers, FlashInfer's attention): `kvxfer warmup --cache-dir DIR` fills it ahead (in an image build), a service started with it loads them instead of compiling; may be read-only once filled", "the libraries' own (~/.triton, ~/.cache/flashinfer)", metavar="DIR")
    _add(g, "--staging-mib", "MiB of registered staging slots for staged transfers (gather, one descriptor, scatter); a request larger than one slot moves directly; 0: none (staging loses on cpu)", _by_device("staging_mib"), metavar="MIB")
    _add(g, "--staging-slots", "how many requests may stage at once; each slot is staging-mib / slots", S.staging_slots, metavar="N")
    _add(g, "--producers", "decode: the prefill services to meet before /ready turns 200, by the side channel of their rank 0 (tcp://HOST:PORT, the address their transfer parameters carry; the handshake's own channel, authenticated with CURVE, so no HTTP API key is shared): handshake with every rank, calibrate, prepare descriptor lists, so that no first request pays for it; repeatable; the variable takes a comma-separated list", "none", metavar="ADDR", nargs="+", action="extend")
    _add(g, "--producers-wait-s", "decode: how long after start /ready waits for a --producers service that does not answer; then ready without it, with a warning, and it is met in the background once it answers", S.producers_wait_s, metavar="S")
    _add(g, "--transfer-path", "decode: auto (the cost model, calibrated against each prefill at handshake, picks), direct, or staged (WRITE; falls back to direct, logged, when a request does not fit a slot)", S.transfer_path, metavar="PATH")


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvxfer proxy`, the OpenAI-compatible front door."""
    parser.epilog = "Every option falls back to the environment variable shown, then to its default."
    _add(parser, "--prefill", "prefill service URL(s); repeatable; the variable takes a comma-separated list", metavar="URL", nargs="+", action="extend")
    _add(parser, "--decode", "decode service URL(s); repeatable; the variable takes a comma-separated list", metavar="URL", nargs="+", action="extend")
    _add(parser, "--host", "HTTP bind address", P.host, metavar="ADDR")
    _add(parser, "--port", "HTTP port: /v1/completions, /health, /ready, /metrics", P.port, metavar="PORT")
    _add(parser, "--request-timeout-s", "seconds one request may take end to end before a 504", P.request_timeout_s, metavar="S")
    _add(parser, "--retry-policy", "after a decode load failure: retry-once (through a fresh prefill) or fail", P.retry_policy, metavar="POLICY")
    _add(parser, "--rehearse", "send one short request of its own through each (prefill, decode) pair once both are ready, and hold /ready until each is answered or failed: a pair's first-time costs (every step's first run, the first push between its ranks) are not a client's", P.rehearse, action=argparse.BooleanOptionalAction)


def serve_config_from_args(args: argparse.Namespace, *, environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Build and validate a ServeConfig from parsed `kvxfer serve` arguments and `environ`
    (default: os.environ)."""
    s = Resolver(args, os.environ if environ is None else environ)
    role = Role(args.role)
    device = s.member("--device", S.device)
    by_device, by_role = DEVICE_DEFAULTS[device], ROLE_DEFAULTS[role]
    model_dir, preset = _model_source(s)
    num_blocks, memory_fraction = _cache_size(s, device)
    insecure = s.switch("--insecure-plaintext", S.insecure_plaintext)
    side_host = s.text("--side-channel-host", S.side_channel_host)
    mode = s.member("--mode", S.mode)
    config = ServeConfig(
        role=role,
        model_dir=model_dir,
        preset=preset,
        seed=s.integer("--seed", S.seed, lo=0),
        tp=s.integer("--tp", S.tp, hi=256),
        layout=s.choice("--layout", tuple(LAYOUTS), S.layout),
        block_size=s.integer("--block-size", S.block_size, hi=4096),
        num_blocks=num_blocks,
        memory_fraction=memory_fraction,
        device=device,
        dtype=s.choice("--dtype", MODEL_DTYPES, by_device.dtype),
        host=s.text("--host", S.host),
        port=s.integer("--port", by_role.port, hi=65535),
        side_channel_host=side_host,
        side_channel_port=s.integer("--side-channel-port", by_role.side_channel_port, hi=65535),
        advertise_host=advertise_host(s, side_host),
        insecure_plaintext=insecure,
        curve=None if insecure else curve_config(s, role, mode),
        mode=mode,
        deadline=Deadline(s.number("--transfer-deadline-s", _DEADLINE.slack_s),
                          s.number("--expected-gbps", _DEADLINE.expected_gbps)),
        lease_s=s.number("--lease-s", S.lease_s),
        engine_id=_engine_id(s),
        nixl_threads=s.switch("--nixl-threads", S.nixl_threads),
        warmup=s.switch("--warmup", S.warmup),
        staging_mib=s.integer("--staging-mib", by_device.staging_mib, lo=0, hi=1 << 20),
        staging_slots=s.integer("--staging-slots", S.staging_slots, hi=1024),
        transfer_path=s.member("--transfer-path", S.transfer_path),
        producers=_producers(s, role),
        producers_wait_s=s.number("--producers-wait-s", S.producers_wait_s),
        kernel_cache=s.path("--kernel-cache"),
    )
    check_serve(config, s)
    return config


def _model_source(s: Resolver) -> tuple[Path | None, str | None]:
    s.exclusive("--model", "--preset")
    model_dir, preset = s.path("--model"), s.text("--preset", None)
    if model_dir is None and preset is None:
        raise ConfigError(f"no model: give --model DIR or --preset NAME (or {env_var('--model')} / {env_var('--preset')})")
    if preset is not None and not _NAME.fullmatch(preset):
        raise s.bad("--preset", preset, "not a preset name (letters, digits, '.', '_', '-')")
    return model_dir, preset


def _cache_size(s: Resolver, device: Device) -> tuple[int | None, float | None]:
    s.exclusive("--num-blocks", "--memory-fraction")
    num_blocks = s.integer("--num-blocks", None)
    fraction = s.number("--memory-fraction", None, hi=1.0)
    if fraction is not None and device is Device.CPU:
        raise s.bad("--memory-fraction", fraction, "needs --device cuda; use --num-blocks on cpu")
    if num_blocks is None and fraction is None:
        return DEVICE_DEFAULTS[device].num_blocks, DEVICE_DEFAULTS[device].memory_fraction
    return num_blocks, fraction


def _producers(s: Resolver, role: Role) -> tuple[str, ...]:
    addresses = s.items("--producers")
    if addresses and role is not Role.DECODE:
        raise s.bad("--producers", ",".join(addresses), "a decode setting: prefill services meet no producers")
    for address in addresses:
        try:
            rank_address(address, 0)
        except ConfigError:
            raise s.bad("--producers", address, "expected tcp://HOST:PORT (rank 0's side channel)") from None
    if len(set(addresses)) != len(addresses):
        raise ConfigError(f"{s.source('--producers')}: an address is listed twice in {list(addresses)}")
    return addresses


def _engine_id(s: Resolver) -> str:
    engine_id = s.text("--engine-id", None) or random_engine_id()
    if not _NAME.fullmatch(engine_id):
        raise s.bad("--engine-id", engine_id, "expected 1-64 letters, digits, '.', '_', '-'")
    return engine_id


def proxy_config_from_args(args: argparse.Namespace, *, environ: Mapping[str, str] | None = None) -> ProxyConfig:
    """Build and validate a ProxyConfig from parsed `kvxfer proxy` arguments and `environ`
    (default: os.environ)."""
    s = Resolver(args, os.environ if environ is None else environ)
    return ProxyConfig(
        prefill_urls=_urls(s, "--prefill"),
        decode_urls=_urls(s, "--decode"),
        host=s.text("--host", P.host),
        port=s.integer("--port", P.port, hi=65535),
        request_timeout_s=s.number("--request-timeout-s", P.request_timeout_s),
        retry_policy=s.member("--retry-policy", P.retry_policy),
        rehearse=s.switch("--rehearse", P.rehearse),
    )


def _urls(s: Resolver, flag: str) -> tuple[str, ...]:
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


__all__ = [
    "CURVE_KEY_ENV_VARS", "DEVICE_DEFAULTS", "ENV_PREFIX", "MODEL_DTYPES", "ROLE_DEFAULTS", "CurveConfig",
    "Deadline", "Device", "ModeChoice", "ProxyConfig", "RetryPolicy", "Role", "ServeConfig", "TransferPathChoice",
    "add_proxy_arguments", "add_serve_arguments", "env_var", "is_loopback", "load_curve_keys",
    "proxy_config_from_args", "serve_config_from_args",
]  # fmt: skip
