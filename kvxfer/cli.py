"""`kvxfer`: the one command-line entry point. Each subcommand lives in `kvxfer/commands/<name>.py`
and exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int`.

Only the CLI reads flags and environment variables; everything below it takes typed config.
Errors kvxfer raises on purpose (`KvxferError`) become one clear line and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from kvxfer.errors import KvxferError

# Order is the order of `kvxfer --help`.
COMMANDS = ("demo", "serve", "proxy", "bench", "plan", "warmup", "keys", "soak")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvxfer",
        description="Move paged KV cache from prefill to decode workers over NIXL.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        # A command that fails to import is a broken install: say so, never drop the command.
        importlib.import_module(f"kvxfer.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KvxferError as err:
        print(f"kvxfer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
