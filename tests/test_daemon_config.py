"""kvxfer.daemons.config: flags, environment fallback (flag > env > default) and validation errors
that name the flag, the variable and the value."""

from __future__ import annotations

import argparse

import pytest

from kvxfer.daemons.config import (
    CURVE_KEY_ENV_VARS,
    CurveConfig,
    Device,
    ModeChoice,
    RetryPolicy,
    Role,
    add_proxy_arguments,
    add_serve_arguments,
    env_var,
    proxy_config_from_args,
    serve_config_from_args,
)
from kvxfer.deadline import Deadline
from kvxfer.errors import ConfigError

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a valid Z85 public key (40 characters)
PLAIN = ["--preset", "tiny", "--insecure-plaintext"]
KEYS = {
    "--curve-secret-key-file": "/keys/prefill.key_secret",
    "--curve-allowed-keys-dir": "/keys/allowed",
    "--curve-server-key-file": "/keys/decode.key",
}
KEY_ARGS = [item for pair in KEYS.items() for item in pair]


def serve(argv: list[str], env: dict[str, str] | None = None):
    parser = argparse.ArgumentParser(prog="kvxfer serve")
    add_serve_arguments(parser)
    return serve_config_from_args(parser.parse_args(argv), environ=env or {})


def proxy(argv: list[str], env: dict[str, str] | None = None):
    parser = argparse.ArgumentParser(prog="kvxfer proxy")
    add_proxy_arguments(parser)
    return proxy_config_from_args(parser.parse_args(argv), environ=env or {})


def test_serve_defaults():
    c = serve(["decode", *PLAIN])
    assert (c.role, c.preset, c.model_dir, c.seed, c.tp) == (Role.DECODE, "tiny", None, 0, 1)
    assert (c.layout, c.block_size, c.num_blocks, c.memory_fraction) == ("flashinfer-hnd", 16, 1024, None)
    assert (c.device, c.dtype, c.host, c.port) == (Device.CPU, "float32", "127.0.0.1", 8200)
    assert (c.side_channel_host, c.side_channel_port, c.advertise_host) == ("127.0.0.1", 5700, "127.0.0.1")
    assert (c.mode, c.deadline, c.lease_s, c.staging_mib, c.staging_slots) == (ModeChoice.AUTO, Deadline(5.0, 0.5), 30.0, 0, 2)
    assert (c.nixl_threads, c.warmup, c.insecure_plaintext, c.curve) == (False, True, True, None)
    assert len(c.engine_id) == 32 and c.engine_id != serve(["decode", *PLAIN]).engine_id


def test_cuda_defaults():
    c = serve(["prefill", *PLAIN, "--device", "cuda"])
    assert (c.dtype, c.num_blocks, c.memory_fraction, c.port, c.side_channel_port) == ("bfloat16", None, 0.9, 8100, 5600)
    assert c.staging_mib == 1024


@pytest.mark.parametrize("slots", [1, 2, 3, 7])
def test_staging_slots_start_on_pages_whatever_their_number(slots):
    from kvxfer.daemons.rank_setup import staging_config

    staging = staging_config(serve(["decode", *PLAIN, "--device", "cuda", "--staging-slots", str(slots)]),
                             max_tokens=8192)
    assert staging.num_slots == slots and staging.max_tokens == 8192
    assert staging.slot_bytes % 4096 == 0  # the GPU copies move 16-byte vectors from each slot's start
    assert 1024 << 20 >= slots * staging.slot_bytes > (1024 << 20) - slots * 4096


def test_every_flag_parses_into_its_field(tmp_path):
    argv = [
        "prefill", "--model", str(tmp_path), "--dtype", "float16", "--tp", "4", "--layout", "flash-attn-nhd",
        "--block-size", "32", "--memory-fraction", "0.5", "--device", "cuda", "--host", "0.0.0.0",
        "--port", "9000", "--side-channel-host", "10.1.2.3", "--side-channel-port", "7000",
        "--advertise-host", "node-1", "--mode", "write", "--transfer-deadline-s", "2",
        "--expected-gbps", "40", "--lease-s", "10", "--engine-id", "p-0", "--nixl-threads", "on",
        "--no-warmup", *KEY_ARGS,
    ]  # fmt: skip
    c = serve(argv)
    assert (c.model_dir, c.preset, c.dtype, c.tp, c.layout, c.block_size) == (tmp_path, None, "float16", 4, "flash-attn-nhd", 32)
    assert (c.memory_fraction, c.num_blocks, c.device, c.host, c.port) == (0.5, None, Device.CUDA, "0.0.0.0", 9000)
    assert c.side_channel_ports == (7000, 7001, 7002, 7003)
    assert (c.side_channel_host, c.advertise_host, c.mode, c.lease_s, c.engine_id) == ("10.1.2.3", "node-1", ModeChoice.WRITE, 10.0, "p-0")
    assert (c.nixl_threads, c.warmup) == (True, False)
    assert c.deadline == Deadline(2.0, 40.0)
    assert str(c.curve.secret_key_file) == KEYS["--curve-secret-key-file"]
    assert str(c.curve.allowed_keys_dir) == KEYS["--curve-allowed-keys-dir"]
    assert str(c.curve.server_key_file) == KEYS["--curve-server-key-file"]


def test_env_fallback_for_every_setting():
    env = {
        "KVXFER_PRESET": "small", "KVXFER_SEED": "7", "KVXFER_TP": "2", "KVXFER_LAYOUT": "packed",
        "KVXFER_BLOCK_SIZE": "8", "KVXFER_NUM_BLOCKS": "64", "KVXFER_HOST": "0.0.0.0", "KVXFER_PORT": "9100",
        "KVXFER_SIDE_CHANNEL_HOST": "127.0.0.2", "KVXFER_SIDE_CHANNEL_PORT": "6000", "KVXFER_MODE": "read",
        "KVXFER_TRANSFER_DEADLINE_S": "1.5", "KVXFER_EXPECTED_GBPS": "3", "KVXFER_LEASE_S": "9",
        "KVXFER_ENGINE_ID": "e1", "KVXFER_NIXL_THREADS": "true", "KVXFER_WARMUP": "0",
        "KVXFER_INSECURE_PLAINTEXT": "1", "KVXFER_DTYPE": "bfloat16", "KVXFER_DEVICE": "cpu",
    }  # fmt: skip
    c = serve(["prefill"], env)
    got = (c.preset, c.seed, c.tp, c.layout, c.block_size, c.num_blocks, c.host, c.port, c.dtype)
    assert got == ("small", 7, 2, "packed", 8, 64, "0.0.0.0", 9100, "bfloat16")
    got = (c.side_channel_host, c.side_channel_ports, c.advertise_host, c.mode, c.deadline)
    assert got == ("127.0.0.2", (6000, 6001), "127.0.0.2", ModeChoice.READ, Deadline(1.5, 3.0))
    assert (c.lease_s, c.engine_id, c.nixl_threads, c.warmup, c.insecure_plaintext) == (9.0, "e1", True, False, True)


@pytest.mark.parametrize(
    ("argv", "env", "field", "expected"),
    [
        (["--tp", "2"], {"KVXFER_TP": "4"}, "tp", 2),  # flag beats env
        ([], {"KVXFER_TP": "4"}, "tp", 4),  # env beats default
        ([], {"KVXFER_TP": ""}, "tp", 1),  # empty variable is unset
        (["--warmup"], {"KVXFER_WARMUP": "off"}, "warmup", True),
        (["--model", "/m"], {"KVXFER_PRESET": "tiny"}, "preset", None),  # a flag silences its sibling's variable
        (["--num-blocks", "8"], {"KVXFER_MEMORY_FRACTION": "0.5", "KVXFER_DEVICE": "cuda"}, "memory_fraction", None),
    ],
)
def test_precedence(argv, env, field, expected):
    base = ["prefill", "--insecure-plaintext"] + ([] if "--model" in argv else ["--preset", "tiny"])
    assert getattr(serve(base + argv, env), field) == expected


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--tp", "0"], {}, "--tp='0': must be in [1, 256]"),
        (["--tp", "two"], {}, "--tp='two': not an integer"),
        ([], {"KVXFER_TP": "x"}, "KVXFER_TP='x' (for --tp): not an integer"),
        (["--block-size", "-16"], {}, "--block-size='-16': must be in [1, 4096]"),
        (["--layout", "paged"], {}, "--layout='paged': must be one of flashinfer-hnd"),
        (["--device", "tpu"], {}, "--device='tpu': must be one of cpu, cuda"),
        (["--dtype", "int8"], {}, "--dtype='int8'"),
        (["--mode", "push"], {}, "--mode='push': must be one of read, write, auto"),
        (["--memory-fraction", "1.5", "--device", "cuda"], {}, "--memory-fraction='1.5': must be in (0.0, 1.0]"),
        (["--memory-fraction", "0.5"], {}, "--memory-fraction=0.5: needs --device cuda"),
        (["--num-blocks", "8", "--memory-fraction", "0.5"], {}, "--num-blocks and --memory-fraction are mutually exclusive"),
        ([], {"KVXFER_NUM_BLOCKS": "8", "KVXFER_MEMORY_FRACTION": "0.5"}, "KVXFER_NUM_BLOCKS (for --num-blocks) and KVXFER_MEMORY_FRACTION"),
        (["--port", "70000"], {}, "--port='70000': must be in [1, 65535]"),
        (["--side-channel-port", "65535", "--tp", "2"], {}, "--side-channel-port=65535: ranks 0..1 need ports up to 65536"),
        (["--port", "5601", "--tp", "2"], {}, "--port=5601: collides with side-channel ports 5600..5601"),
        (["--lease-s", "5"], {}, "--lease-s=5.0: must exceed --transfer-deadline-s=5.0"),
        (["--expected-gbps", "0"], {}, "--expected-gbps='0': must be in (0.0, inf]"),
        (["--transfer-deadline-s", "soon"], {}, "--transfer-deadline-s='soon': not a number"),
        ([], {"KVXFER_WARMUP": "maybe"}, "KVXFER_WARMUP='maybe' (for --warmup): must be one of 1, true"),
        (["--nixl-threads", "auto"], {}, "--nixl-threads='auto'"),
        (["--engine-id", "a b"], {}, "--engine-id='a b'"),
        (["--side-channel-host", "0.0.0.0"], {}, "--side-channel-host='0.0.0.0': a wildcard: give --advertise-host"),
        (["--side-channel-host", "*"], {}, "--side-channel-host='*': a wildcard: give --advertise-host"),
        (["--advertise-host", "0.0.0.0"], {}, "--advertise-host='0.0.0.0': peers cannot connect"),
        (["--side-channel-host", "10.0.0.5"], {}, "--side-channel-host='10.0.0.5': --insecure-plaintext is for loopback only"),
    ],
)
def test_serve_errors_name_flag_and_value(argv, env, message):
    with pytest.raises(ConfigError) as err:
        serve(["prefill", *PLAIN, *argv], env)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "no model: give --model DIR or --preset NAME"),
        (["--model", "/m", "--preset", "tiny"], {}, "--model and --preset are mutually exclusive"),
        ([], {"KVXFER_MODEL": "/m", "KVXFER_PRESET": "tiny"}, "KVXFER_MODEL (for --model) and KVXFER_PRESET (for --preset) are mutually exclusive"),
        (["--preset", "../etc"], {}, "--preset='../etc': not a preset name"),
    ],
)
def test_model_source_errors(argv, env, message):
    with pytest.raises(ConfigError) as err:
        serve(["decode", "--insecure-plaintext", *argv], env)
    assert message in str(err.value)


def test_producers_of_a_decode_service():
    assert (serve(["decode", *PLAIN]).producers, serve(["decode", *PLAIN]).producers_wait_s) == ((), 60.0)
    c = serve(["decode", *PLAIN, "--producers", "tcp://p0:5600", "--producers", "tcp://[::1]:5600"])
    assert c.producers == ("tcp://p0:5600", "tcp://[::1]:5600")
    c = serve(["decode", *PLAIN], {"KVXFER_PRODUCERS": "tcp://a:1, tcp://b:2", "KVXFER_PRODUCERS_WAIT_S": "2.5"})
    assert (c.producers, c.producers_wait_s) == (("tcp://a:1", "tcp://b:2"), 2.5)


@pytest.mark.parametrize(
    ("role", "argv", "env", "message"),
    [
        ("prefill", ["--producers", "tcp://p:1"], {}, "--producers='tcp://p:1': a decode setting"),
        ("decode", ["--producers", "http://p:8100"], {}, "--producers='http://p:8100': expected tcp://HOST:PORT"),
        ("decode", [], {"KVXFER_PRODUCERS": "tcp://p"}, "KVXFER_PRODUCERS='tcp://p' (for --producers): expected tcp://HOST:PORT"),
        ("decode", ["--producers", "tcp://p:1", "tcp://p:1"], {}, "an address is listed twice"),
        ("decode", ["--producers-wait-s", "0"], {}, "--producers-wait-s='0': must be in (0.0, inf]"),
    ],
)
def test_producers_errors_name_flag_and_value(role, argv, env, message):
    with pytest.raises(ConfigError) as err:
        serve([role, *PLAIN, *argv], env)
    assert message in str(err.value)


def test_curve_is_on_by_default_and_needs_keys():
    with pytest.raises(ConfigError, match="CURVE is on and no key pair is set: give --curve-secret-key-file"):
        serve(["prefill", "--preset", "tiny"])
    with pytest.raises(ConfigError, match="no client is allowed: give --curve-allowed-keys-dir"):
        serve(["prefill", "--preset", "tiny", "--curve-secret-key-file", "/k"])
    with pytest.raises(ConfigError, match="decode service connects to peers .--mode read.: give --curve-server-key-file"):
        serve(["decode", "--preset", "tiny", "--mode", "read", "--curve-secret-key-file", "/k", "--curve-allowed-keys-dir", "/a"])


def test_prefill_in_read_mode_needs_no_server_key():
    c = serve(["prefill", "--preset", "tiny", "--mode", "read", "--curve-secret-key-file", "/k", "--curve-allowed-keys-dir", "/a"])
    assert c.curve is not None and c.curve.server_key_file is None and not c.insecure_plaintext


def test_curve_keys_from_environment_are_not_shown():
    secret = KEY.replace("r", "s")
    env = {"KVXFER_CURVE_SECRET_KEY": secret, "KVXFER_CURVE_SERVER_KEY": KEY, "KVXFER_CURVE_ALLOWED_KEYS": f"{KEY}, {KEY[::-1]}"}
    c = serve(["decode", "--preset", "tiny"], env)
    assert (c.curve.secret_key, c.curve.server_key, c.curve.allowed_keys) == (secret, KEY, (KEY, KEY[::-1]))
    assert secret not in repr(c)
    assert set(env) <= set(CURVE_KEY_ENV_VARS)


def test_curve_key_file_beats_key_material_and_bad_keys_are_not_echoed():
    c = serve(["decode", "--preset", "tiny", *KEY_ARGS], {"KVXFER_CURVE_SECRET_KEY": "garbage"})
    assert c.curve.secret_key is None
    with pytest.raises(ConfigError) as err:
        serve(["decode", "--preset", "tiny"], {"KVXFER_CURVE_SECRET_KEY": "short-secret"})
    assert "KVXFER_CURVE_SECRET_KEY (for --curve-secret-key-file): not a 40-character Z85 key (12 characters)" in str(err.value)
    assert "short-secret" not in str(err.value)


def test_plaintext_and_keys_env_files():
    env = {env_var(flag): path for flag, path in KEYS.items()}
    c = serve(["decode", "--preset", "tiny"], env)
    assert str(c.curve.allowed_keys_dir) == "/keys/allowed" and str(c.curve.server_key_file) == "/keys/decode.key"


def test_env_var_names():
    assert env_var("--side-channel-port") == "KVXFER_SIDE_CHANNEL_PORT"
    assert env_var("--curve-allowed-keys-dir") == "KVXFER_CURVE_ALLOWED_KEYS_DIR"


@pytest.mark.parametrize("add", [add_serve_arguments, add_proxy_arguments])
def test_help_names_the_variable_of_every_flag(add):
    parser = argparse.ArgumentParser()
    add(parser)
    text = parser.format_help()
    for action in parser._actions:  # argparse has no public list of its options
        for flag in action.option_strings:
            negation = flag.startswith("--no-") and f"--{flag[5:]}" in action.option_strings  # its switch's variable
            if flag.startswith("--") and flag != "--help" and not negation:
                assert env_var(flag) in text, flag
                assert action.help and len(action.help) > 20, flag


def test_proxy_defaults_and_lists():
    c = proxy(["--prefill", "http://p0:8100", "http://p1:8100/", "--decode", "http://d0:8200", "--prefill", "https://p2"])
    assert c.prefill_urls == ("http://p0:8100", "http://p1:8100", "https://p2")
    assert (c.decode_urls, c.host, c.port, c.request_timeout_s, c.retry_policy) == (("http://d0:8200",), "127.0.0.1", 8000, 120.0, RetryPolicy.RETRY_ONCE)


def test_proxy_env_fallback():
    env = {"KVXFER_PREFILL": "http://a:1, http://b:2", "KVXFER_DECODE": "http://c:3", "KVXFER_PORT": "80",
           "KVXFER_HOST": "0.0.0.0", "KVXFER_REQUEST_TIMEOUT_S": "3", "KVXFER_RETRY_POLICY": "fail"}  # fmt: skip
    c = proxy([], env)
    assert (c.prefill_urls, c.decode_urls, c.port, c.host, c.request_timeout_s, c.retry_policy) == (
        ("http://a:1", "http://b:2"), ("http://c:3",), 80, "0.0.0.0", 3.0, RetryPolicy.FAIL)
    assert proxy(["--decode", "http://x:1"], env).decode_urls == ("http://x:1",)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--decode", "http://d:1"], {}, "no --prefill service: give --prefill URL (or KVXFER_PREFILL"),
        (["--prefill", "http://p:1"], {}, "no --decode service"),
        (["--prefill", "p:1", "--decode", "http://d:1"], {}, "--prefill='p:1': expected http(s)://HOST[:PORT]"),
        (["--prefill", "http://p:1/v1", "--decode", "http://d:1"], {}, "--prefill='http://p:1/v1'"),
        (["--prefill", "http://p:x", "--decode", "http://d:1"], {}, "--prefill='http://p:x': bad port"),
        (["--prefill", "http://p:1", "http://p:1/", "--decode", "http://d:1"], {}, "a URL is listed twice"),
        ([], {"KVXFER_PREFILL": "http://p:1", "KVXFER_DECODE": "ftp://d"}, "KVXFER_DECODE='ftp://d' (for --decode): expected http(s)"),
        (["--prefill", "http://p:1", "--decode", "http://d:1", "--retry-policy", "twice"], {}, "--retry-policy='twice': must be one of retry-once, fail"),
        (["--prefill", "http://p:1", "--decode", "http://d:1", "--request-timeout-s", "0"], {}, "--request-timeout-s='0': must be in (0.0, inf]"),
    ],
)
def test_proxy_errors(argv, env, message):
    with pytest.raises(ConfigError) as err:
        proxy(argv, env)
    assert message in str(err.value)


def test_load_curve_keys_reads_generated_key_files(tmp_path):
    keys = pytest.importorskip("kvxfer.agents.keys")
    from kvxfer.daemons.config import load_curve_keys

    prefill, decode = keys.generate_keypair(), keys.generate_keypair()
    keys.write_keypair(prefill, tmp_path, "prefill")
    keys.write_keypair(decode, tmp_path / "allowed", "decode")
    argv = ["prefill", "--preset", "tiny", "--curve-secret-key-file", str(tmp_path / "prefill.key_secret"),
            "--curve-allowed-keys-dir", str(tmp_path / "allowed"), "--curve-public-key-file", str(tmp_path / "prefill.key")]  # fmt: skip
    loaded = load_curve_keys(serve(argv, {"KVXFER_CURVE_SERVER_KEY": decode.public.decode()}).curve)
    assert loaded.own == prefill and loaded.server_public_key == decode.public
    assert loaded.allowed_client_keys == {decode.public}
    mismatch = CurveConfig(secret_key=prefill.secret.decode(), public_key=decode.public.decode())
    with pytest.raises(ConfigError, match="not the public key of the secret key"):
        load_curve_keys(mismatch)
    with pytest.raises(ConfigError, match="no \\*.key files"):
        (tmp_path / "empty").mkdir()
        load_curve_keys(CurveConfig(secret_key=prefill.secret.decode(), allowed_keys_dir=tmp_path / "empty"))


def _help_of(add, flag: str) -> str:
    parser = argparse.ArgumentParser()
    add(parser)
    action = next(a for a in parser._actions if flag in a.option_strings)  # no public list of options
    return action.help or ""


def _typed(value: object) -> str:
    """A value as a user types it on the command line."""
    value = getattr(value, "value", value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize(("flag", "of"), [
    ("--seed", lambda c: c.seed), ("--tp", lambda c: c.tp), ("--layout", lambda c: c.layout),
    ("--block-size", lambda c: c.block_size), ("--device", lambda c: c.device), ("--host", lambda c: c.host),
    ("--side-channel-host", lambda c: c.side_channel_host), ("--mode", lambda c: c.mode),
    ("--transfer-deadline-s", lambda c: c.deadline.slack_s), ("--expected-gbps", lambda c: c.deadline.expected_gbps),
    ("--lease-s", lambda c: c.lease_s), ("--nixl-threads", lambda c: c.nixl_threads), ("--warmup", lambda c: c.warmup),
    ("--staging-slots", lambda c: c.staging_slots), ("--transfer-path", lambda c: c.transfer_path),
    ("--producers-wait-s", lambda c: c.producers_wait_s),
])  # fmt: skip
def test_serve_help_states_the_default_a_service_gets(flag, of):
    assert f"(default: {_typed(of(serve(['decode', *PLAIN])))})" in _help_of(add_serve_arguments, flag)


@pytest.mark.parametrize(("flag", "of"), [
    ("--dtype", lambda c: c.dtype), ("--num-blocks", lambda c: c.num_blocks),
    ("--memory-fraction", lambda c: c.memory_fraction), ("--staging-mib", lambda c: c.staging_mib),
])  # fmt: skip
def test_serve_help_states_each_device_s_default(flag, of):
    got = {device: of(serve(["decode", *PLAIN, "--device", device])) for device in ("cuda", "cpu")}
    shown = ", ".join(f"{_typed(value)} on {device}" for device, value in got.items() if value is not None)
    assert f"(default: {shown})" in _help_of(add_serve_arguments, flag)


def test_serve_help_states_each_role_s_ports():
    prefill, decode = serve(["prefill", *PLAIN]), serve(["decode", *PLAIN])
    assert f"(default: {prefill.port} prefill, {decode.port} decode)" in _help_of(add_serve_arguments, "--port")
    ports = f"(default: {prefill.side_channel_port} prefill, {decode.side_channel_port} decode)"
    assert ports in _help_of(add_serve_arguments, "--side-channel-port")


@pytest.mark.parametrize(("flag", "of"), [
    ("--host", lambda c: c.host), ("--port", lambda c: c.port),
    ("--request-timeout-s", lambda c: c.request_timeout_s), ("--retry-policy", lambda c: c.retry_policy),
    ("--rehearse", lambda c: c.rehearse),
])  # fmt: skip
def test_proxy_help_states_the_default_a_proxy_gets(flag, of):
    c = proxy(["--prefill", "http://p:1", "--decode", "http://d:1"])
    assert f"(default: {_typed(of(c))})" in _help_of(add_proxy_arguments, flag)
