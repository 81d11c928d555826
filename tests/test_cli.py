"""kvxfer.cli: every command is there, and a command that cannot be imported stops the CLI
instead of vanishing from it."""

from __future__ import annotations

import pytest

from kvxfer import cli


def test_every_command_is_registered(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    listed = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"\n    {name} " in listed, name


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "no_such_command"))
    with pytest.raises(ModuleNotFoundError, match="kvxfer.commands.no_such_command"):
        cli.build_parser()
