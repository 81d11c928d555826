"""CURVE keys: `kvxfer keys generate`, key files, what a KeyConfig shows."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq.auth

from kvxfer.agents.keys import (
    KeyConfig,
    KeyPair,
    generate_keypair,
    load_allowed_keys,
    load_keypair,
    load_public_key,
    parse_key,
)
from kvxfer.cli import main
from kvxfer.errors import ConfigError


def generate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    assert main(["keys", "generate", "--out", str(tmp_path / "keys"), "--name", name]) == 0
    return tmp_path / "keys" / f"{name}.key", tmp_path / "keys" / f"{name}.key_secret"


def test_generate_writes_owner_only_files_that_load_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    public_path, secret_path = generate(tmp_path, "prefill")
    for path in (public_path, secret_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.parent.stat().st_mode) == 0o700
    pair = load_keypair(secret_path)
    assert load_public_key(public_path) == pair.public
    assert pair.secret.decode() not in capsys.readouterr().out


def test_generate_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate(tmp_path, "a")
    assert main(["keys", "generate", "--out", str(tmp_path / "keys"), "--name", "a"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_public_prints_the_public_key_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, secret_path = generate(tmp_path, "a")
    capsys.readouterr()
    assert main(["keys", "public", "--secret", str(secret_path)]) == 0
    assert capsys.readouterr().out.strip() == load_keypair(secret_path).public.decode()


def test_a_secret_file_others_can_read_is_refused(tmp_path: Path) -> None:
    _, secret_path = generate(tmp_path, "a")
    secret_path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_keypair(secret_path)


def test_zeromq_certificates_are_read_too(tmp_path: Path) -> None:
    public_path, secret_path = zmq.auth.create_certificates(str(tmp_path), "zmq")
    Path(secret_path).chmod(0o600)
    pair = load_keypair(Path(secret_path))
    assert load_public_key(Path(public_path)) == pair.public
    assert load_allowed_keys([tmp_path]) == frozenset({pair.public})


def test_key_material_never_shows_in_reprs_or_errors() -> None:
    pair = generate_keypair()
    assert pair.secret.decode() not in repr(pair)
    assert pair.secret.decode() not in repr(KeyConfig(own=pair))
    bad = pair.secret.decode()[:-1] + "~"  # '~' is not Z85
    with pytest.raises(ConfigError) as info:
        parse_key(bad, what="secret key")
    assert bad not in str(info.value)


def test_mismatched_pair_is_refused() -> None:
    a, b = generate_keypair(), generate_keypair()
    with pytest.raises(ConfigError, match="does not belong"):
        KeyPair(public=a.public, secret=b.secret)
