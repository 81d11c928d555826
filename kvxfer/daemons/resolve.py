"""Where each setting of `kvxfer serve` / `kvxfer proxy` comes from: the flag `--some-flag`, else
the environment variable `KVXFER_SOME_FLAG`, else its default (flag > env > default). An empty
variable counts as unset. Malformed values fail with a ConfigError that names the flag (and the
variable, when the value came from one) and the value."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import TypeVar

from kvxfer.errors import ConfigError

ENV_PREFIX = "KVXFER_"
T = TypeVar("T")
E = TypeVar("E", bound=Enum)


def env_var(flag: str) -> str:
    """`--side-channel-port` -> `KVXFER_SIDE_CHANNEL_PORT`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _attr(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


class Resolver:
    """Each setting's raw value and where it came from: the flag, else its variable, else None.
    The typed getters return `default` for a setting given nowhere."""

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str]):
        self.args = args
        self.environ = environ
        self.env_ignored: set[str] = set()  # flags whose variable loses to a sibling's flag

    def raw(self, flag: str) -> tuple[object, str | None]:
        """(value, name of the variable it came from, or None when it came from the flag)."""
        value = getattr(self.args, _attr(flag), None)
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
        on_command_line = [f for f in flags if getattr(self.args, _attr(f), None) is not None]
        if on_command_line:
            self.env_ignored.update(set(flags) - set(on_command_line))
        chosen = [self.source(f) for f in flags if self.given(f)]
        if len(chosen) > 1:
            raise ConfigError(f"{' and '.join(chosen)} are mutually exclusive: give one")

    def text(self, flag: str, default: T) -> str | T:
        value, _ = self.raw(flag)
        return default if value is None else str(value).strip()

    def path(self, flag: str) -> Path | None:
        value = self.text(flag, None)
        return None if value is None else Path(value)

    def integer(self, flag: str, default: T, *, lo: int = 1, hi: int = 2**31) -> int | T:
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

    def number(self, flag: str, default: T, *, lo: float = 0.0, hi: float = float("inf")) -> float | T:
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

    def member(self, flag: str, default: E) -> E:
        """One of the members of `default`'s enum, by value."""
        enum = type(default)
        return enum(self.choice(flag, tuple(m.value for m in enum), default.value))

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
