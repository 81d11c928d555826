"""`kvxfer keys`: CURVE key pairs for the side channel, and where other commands get their keys.

    kvxfer keys generate --out DIR [--name NAME]   writes NAME.key and NAME.key_secret (0600)
    kvxfer keys public --secret FILE                prints the public key of a secret key file

Other commands take side-channel keys with `add_key_arguments(parser)` and turn them into a
`KeyConfig` with `key_config_from_args(args, environ)`. A flag wins over its environment
variable:

    --curve-secret-key FILE   KVXFER_CURVE_SECRET_KEY    own secret key (Z85 text or a file)
    --curve-server-key FILE   KVXFER_CURVE_SERVER_KEY    the server's public key (clients)
    --curve-allowed-keys P    KVXFER_CURVE_ALLOWED_KEYS  allowed client public keys (servers):
                                                         comma-separated Z85 keys, files or dirs
    --insecure-side-channel                              plaintext, no authentication

(KVXFER_CURVE_PUBLIC_KEY, if set, must match the public key derived from the secret key.)
Keys are never printed except by `keys public`, which prints a public key on purpose.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from kvxfer.agents.keys import (
    Z85_KEY_LEN,
    KeyConfig,
    KeyPair,
    generate_keypair,
    load_allowed_keys,
    load_keypair,
    load_public_key,
    parse_key,
    write_keypair,
)
from kvxfer.errors import ConfigError

ENV_SECRET = "KVXFER_CURVE_SECRET_KEY"
ENV_PUBLIC = "KVXFER_CURVE_PUBLIC_KEY"
ENV_SERVER = "KVXFER_CURVE_SERVER_KEY"
ENV_ALLOWED = "KVXFER_CURVE_ALLOWED_KEYS"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("keys", help="CURVE key pairs for the side channel")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="write a new key pair (NAME.key, NAME.key_secret)")
    gen.add_argument("--out", type=Path, required=True, help="directory to write into (created 0700)")
    gen.add_argument("--name", default="kvxfer", help="file name stem (default: kvxfer)")
    gen.set_defaults(func=_generate)
    pub = sub.add_parser("public", help="print the public key of a secret key file")
    pub.add_argument("--secret", type=Path, required=True, help="a NAME.key_secret file")
    pub.set_defaults(func=_public)


def _generate(args: argparse.Namespace) -> int:
    public_path, secret_path = write_keypair(generate_keypair(), args.out, args.name)
    print(f"wrote {public_path} (public: share with peers)")
    print(f"wrote {secret_path} (secret: owner-only, never share)")
    return 0


def _public(args: argparse.Namespace) -> int:
    print(load_keypair(args.secret).public.decode())
    return 0


def add_key_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("side-channel security")
    group.add_argument("--curve-secret-key", metavar="FILE", help=f"own secret key file (env {ENV_SECRET})")
    group.add_argument("--curve-server-key", metavar="KEY", help=f"server public key or file (env {ENV_SERVER})")
    group.add_argument(
        "--curve-allowed-keys", metavar="LIST", help=f"allowed client keys: Z85 keys, files or dirs, comma-separated (env {ENV_ALLOWED})"
    )
    group.add_argument(
        "--insecure-side-channel", action="store_true", help="plaintext side channel, no authentication (local experiments only)"
    )


def key_config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> KeyConfig | None:
    """The KeyConfig the flags and environment describe; None with --insecure-side-channel."""
    env = os.environ if environ is None else environ
    if getattr(args, "insecure_side_channel", False):
        return None
    secret = getattr(args, "curve_secret_key", None) or env.get(ENV_SECRET)
    if not secret:
        raise ConfigError(f"side channel: no CURVE secret key (--curve-secret-key or {ENV_SECRET}), or pass --insecure-side-channel")
    own = _keypair(secret)
    if env.get(ENV_PUBLIC) and parse_key(env[ENV_PUBLIC], what=ENV_PUBLIC) != own.public:
        raise ConfigError(f"{ENV_PUBLIC} does not belong to the secret key")
    server = getattr(args, "curve_server_key", None) or env.get(ENV_SERVER)
    allowed = getattr(args, "curve_allowed_keys", None) or env.get(ENV_ALLOWED)
    return KeyConfig(
        own=own,
        server_public_key=_public_key(server, what="server key") if server else None,
        allowed_client_keys=_allowed(allowed) if allowed else frozenset(),
    )


def _looks_like_key(text: str) -> bool:
    return len(text.strip()) == Z85_KEY_LEN and not Path(text.strip()).exists()


def _keypair(value: str) -> KeyPair:
    if _looks_like_key(value):
        return KeyPair.from_secret(value, what="secret key")
    return load_keypair(Path(value))


def _public_key(value: str, *, what: str) -> bytes:
    return parse_key(value, what=what) if _looks_like_key(value) else load_public_key(Path(value))


def _allowed(value: str) -> frozenset[bytes]:
    keys: set[bytes] = set()
    for item in filter(None, (part.strip() for part in value.split(","))):
        if _looks_like_key(item):
            keys.add(parse_key(item, what="allowed client key"))
        else:
            keys |= load_allowed_keys([Path(item)])
    return frozenset(keys)
