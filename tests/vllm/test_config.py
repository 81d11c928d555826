"""The connector's pure parts, table-driven: settings, kv_transfer_params, unsupported setups."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import pytest

from kvxfer.agents.keys import generate_keypair
from kvxfer.agents.messages import Binding, TransferParams
from kvxfer.agents.transfer_choice import ModeChoice, TransferPathChoice
from kvxfer.errors import ConfigError
from kvxfer.integrations.vllm.config import ConnectorRole, parse_config
from kvxfer.integrations.vllm.params import binding_for, consumer_params, producer_reply

PRODUCER, CONSUMER = generate_keypair(), generate_keypair()
PRODUCER_KEYS = {"curve_secret_key": PRODUCER.secret.decode(),
                 "curve_allowed_keys": [CONSUMER.public.decode()]}
CONSUMER_KEYS = {"curve_secret_key": CONSUMER.secret.decode(),
                 "curve_server_key": PRODUCER.public.decode()}


def parse(extra: dict, role: str = "kv_producer"):
    return parse_config(extra, role=role, engine_id="e1", default_fingerprint="llama-x")


def test_producer_and_consumer_settings():
    producer = parse({**PRODUCER_KEYS, "side_channel_port": 5600, "advertise_host": "10.0.0.5",
                      "side_channel_host": "0.0.0.0", "lease_s": "60"})
    assert producer.role is ConnectorRole.PRODUCER and producer.mode is ModeChoice.AUTO and producer.staging_bytes("cuda") == 128 << 20
    assert producer.side_channel_address(3) == "tcp://10.0.0.5:5603"
    assert producer.lease_s == 60.0 and producer.keys.allowed_client_keys == {CONSUMER.public}
    consumer = parse({**CONSUMER_KEYS, "mode": "WRITE", "transfer_path": "staged", "staging_mib": 8},
                     role="kv_consumer")
    assert consumer.mode is ModeChoice.WRITE and consumer.keys.server_public_key == PRODUCER.public
    assert consumer.transfer_path is TransferPathChoice.STAGED and consumer.staging_bytes("cpu") == 8 << 20
    assert parse({"insecure_plaintext": "true"}, role="kv_consumer").keys is None


@pytest.mark.parametrize(("extra", "role", "match"), [
    ({"side_channel_prot": 1}, "kv_producer", "unknown key.*side_channel_prot"),
    ({}, "kv_both", "kv_both"),
    ({**PRODUCER_KEYS, "side_channel_port": 0}, "kv_producer", "side_channel_port=0: outside"),
    ({"insecure_plaintext": True, "side_channel_host": "10.0.0.5", "side_channel_port": 1},
     "kv_producer", "only on loopback"),
    ({**CONSUMER_KEYS, "mode": "sideways"}, "kv_consumer", r"mode='sideways': expected one of \['read', 'write', 'auto'\]"),
    ({**CONSUMER_KEYS, "staging_mib": -1}, "kv_consumer", "staging_mib=-1"),
    ({**CONSUMER_KEYS, "lease_s": 2, "transfer_deadline_s": 5}, "kv_consumer", "lease_s=2.0 must exceed"),
    ({**CONSUMER_KEYS, "lease_s": "soon"}, "kv_consumer", "lease_s='soon': expected a float"),
    ({"curve_server_key": PRODUCER.public.decode()}, "kv_consumer", "strict mode, which needs this consumer's key pair"),
    ({**CONSUMER_KEYS, "curve_server_key": "x" * 39}, "kv_consumer", "curve_server_key: not a Z85"),
    ({"side_channel_port": 1, "advertise_host": "0.0.0.0", "insecure_plaintext": True}, "kv_producer",
     "wildcard"),
])
def test_settings_errors_name_the_key(extra, role, match):
    with pytest.raises(ConfigError, match=match):
        parse(extra, role)


def test_drop_in_needs_no_extra_config(tmp_path, monkeypatch):
    """No keys at all: still CURVE. A producer's key pair is made once per instance (its
    scheduler and workers read the same file) and admits any consumer; a consumer pins nothing
    and takes the producer's key from each request's parameters."""
    from kvxfer.integrations.vllm import config as cfg

    monkeypatch.setattr(cfg, "INSTANCE_KEY_DIR", tmp_path / "keys")  # not the machine's /tmp
    producer, again = parse({}), parse({})
    assert producer.keys is not None and producer.keys.admit_any_client and producer.side_channel_port == 5700
    assert producer.keys.own == again.keys.own  # the instance's processes agree
    assert parse({}).producer_key == producer.keys.own.public.decode() and producer.grants_unbound
    other = parse_config({}, role="kv_producer", engine_id="e2", default_fingerprint="x")
    assert other.keys.own != producer.keys.own
    consumer = parse({}, role="kv_consumer")
    assert consumer.keys is not None and consumer.keys.server_public_key is None
    strict = parse({**PRODUCER_KEYS, "side_channel_port": 5600})
    assert not strict.keys.admit_any_client and strict.producer_key == "" and not strict.grants_unbound


def _params(**changes) -> TransferParams:
    fields = {"engine_id": "p", "boot_epoch": 7, "request_id": "ab" * 16, "block_ids": [3, 4],
              "side_channel": "tcp://127.0.0.1:5600", "tp_size": 2, "num_tokens": 20}
    return TransferParams(**{**fields, **changes})


def test_params_round_trip_through_a_json_proxy():
    params = _params(binding=Binding(consumer_key=CONSUMER.public.decode()))
    reply = msgspec.json.decode(msgspec.json.encode(producer_reply(params)))
    assert reply["do_remote_prefill"] is True and reply["do_remote_decode"] is False
    assert consumer_params(reply) == params
    kvxfer_proxy = msgspec.json.decode(msgspec.json.encode(params))  # forwards kvxfer's fields only
    assert consumer_params(kvxfer_proxy) == params


@pytest.mark.parametrize("params", [
    None, {}, {"do_remote_decode": True}, {**msgspec.to_builtins(_params()), "do_remote_prefill": False},
    {"do_remote_prefill": True, "request_id": "x"},  # malformed: logged, computed locally
])
def test_requests_computed_locally(params):
    assert consumer_params(params) is None


def test_binding():
    one = frozenset({CONSUMER.public})
    assert binding_for({"do_remote_decode": True}, one) == Binding(consumer_key=CONSUMER.public.decode())
    assert binding_for({"consumer_key": "K" * 40}, one) == Binding(consumer_key="K" * 40)
    assert binding_for(None, one | {PRODUCER.public}) == Binding()


def _vllm_config(*, pp=1, dcp=1, dp=1, mla=False):
    return SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp, decode_context_parallel_size=dcp,
                                        data_parallel_size=dp),
        model_config=SimpleNamespace(use_mla=mla))


def _cache_config(*kinds: str):
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=type(k, (), {})()) for k in kinds])


@pytest.mark.parametrize(("vllm_config", "cache_config", "match"), [
    (_vllm_config(pp=2), _cache_config("FullAttentionSpec"), "pipeline parallelism"),
    (_vllm_config(dcp=2), _cache_config("FullAttentionSpec"), "decode context parallelism"),
    (_vllm_config(dp=2), _cache_config("FullAttentionSpec"), "data parallelism"),
    (_vllm_config(mla=True), _cache_config("FullAttentionSpec"), "MLA"),
    (_vllm_config(), _cache_config("FullAttentionSpec", "SlidingWindowSpec"), "hybrid models"),
    (_vllm_config(), _cache_config("MambaSpec"), "hybrid models"),
])
def test_unsupported_setups_are_refused(vllm_config, cache_config, match):
    from kvxfer.integrations.vllm.connector import check_supported

    with pytest.raises(ConfigError, match=match):
        check_supported(vllm_config, cache_config)
    check_supported(_vllm_config(), _cache_config("FullAttentionSpec"))


def test_packed_layout_matches_the_cpu_backends_own_view():
    """Every (block, K/V, head, token) row that `packed` strides address holds what vLLM's CPU
    attention takes as that K or V row: `kv_cache.view(N, H, 2 * bs, D).chunk(2, dim=2)`."""
    import numpy as np
    import torch

    from kvxfer.layouts import describe_shape

    n, h, bs, d = 3, 2, 32, 8
    cache = torch.arange(n * h * bs * 2 * d, dtype=torch.float32).view(n, h, bs, 2 * d)
    key, value = cache.view(n, h, 2 * bs, d).chunk(2, dim=2)
    desc = describe_shape("packed", tuple(cache.shape), num_layers=1, dtype="float32")
    flat = cache.numpy().reshape(-1).view(np.uint8)
    for kv, want in enumerate((key, value)):
        for b, head, tok in [(0, 0, 0), (1, 1, 5), (2, 0, 31), (2, 1, 17)]:
            at = b * desc.block_stride + kv * desc.kv_stride + head * desc.head_stride + tok * desc.token_stride
            got = flat[at:at + desc.row_bytes].view(np.float32)
            assert np.array_equal(got, want[b, head, tok].numpy()), (kv, b, head, tok)
