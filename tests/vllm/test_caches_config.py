"""The connector's cache hooks against vLLM's own config code (no server): the layout it asks for
is what vLLM resolves, unless VLLM_KV_CACHE_LAYOUT says otherwise; the backend it reads from the
config is the one vLLM will use; context parallelism on either side is refused at start-up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvxfer.errors import ConfigError

CONNECTOR = {"kv_connector": "KvxferConnector", "kv_connector_module_path": "kvxfer.integrations.vllm",
             "kv_role": "kv_consumer"}


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    from vllm.engine.arg_utils import EngineArgs

    from kvxfer.integrations.vllm.testing import build_tiny_llama

    model = build_tiny_llama(tmp_path_factory.mktemp("model") / "tiny", seed=0)
    return EngineArgs(model=str(model), enforce_eager=True, max_model_len=256,
                      kv_transfer_config=CONNECTOR).create_engine_config()


def _resolve(vllm_config, supported):
    import copy

    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout

    config = copy.copy(vllm_config)
    config.cache_config = copy.copy(vllm_config.cache_config)
    config.cache_config.kv_cache_layout = None  # resolved once per engine: start afresh
    return resolve_kv_cache_layout(config, supported).name


def test_vllm_resolves_the_connectors_request_to_lbhnc(vllm_config, monkeypatch):
    from vllm.distributed.kv_transfer.kv_connector.utils import get_kv_connector_cache_layout

    monkeypatch.delenv("VLLM_KV_CACHE_LAYOUT", raising=False)
    assert get_kv_connector_cache_layout(vllm_config) == "HND"
    # vLLM's own default would be the first supported layout (LBNHC here); the connector's wins
    assert _resolve(vllm_config, [["LBNHC", "LBHNC", "BLHNC"]]) == "LBHNC"
    assert _resolve(vllm_config, [["LBHNC"]]) == "LBHNC"  # CPU_ATTN's only layout
    monkeypatch.setenv("VLLM_KV_CACHE_LAYOUT", "LBNHC")  # a user's choice still wins
    assert _resolve(vllm_config, [["LBNHC", "LBHNC", "BLHNC"]]) == "LBNHC"


def test_the_backend_is_read_from_vllms_config(vllm_config):
    from kvxfer.integrations.vllm.connector import cache_source_of

    source = cache_source_of(vllm_config)
    assert (source.backend, source.block_size, source.use_mla) == ("CPU_ATTN", vllm_config.cache_config.block_size,
                                                                   False)
    assert source.head_size == vllm_config.model_config.get_head_size()


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_context_parallelism_is_refused(kind):
    from kvxfer.integrations.vllm.connector import check_supported

    par = SimpleNamespace(pipeline_parallel_size=1, data_parallel_size=1, decode_context_parallel_size=1,
                          prefill_context_parallel_size=1)
    setattr(par, f"{kind}_context_parallel_size", 2)
    config = SimpleNamespace(parallel_config=par, model_config=SimpleNamespace(use_mla=False))
    groups = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=type("FullAttentionSpec", (), {})())])
    with pytest.raises(ConfigError, match=f"{kind} context parallelism is not supported \\({kind}_context"):
        check_supported(config, groups)
