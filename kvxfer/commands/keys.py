"""`kvxfer keys`: CURVE key pairs for the side channel.

    kvxfer keys generate --out DIR [--name NAME]   writes NAME.key and NAME.key_secret (0600)
    kvxfer keys public --secret FILE                prints the public key of a secret key file

`kvxfer serve` reads the files (or key material from the environment) through its
`--curve-*` flags (kvxfer.daemons.config). Keys are never printed except by `keys public`, which
prints a public key on purpose.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvxfer.agents.keys import generate_keypair, load_keypair, write_keypair


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
