"""The vLLM plugin's tests run only under .venv-vllm's interpreter (`make test-vllm`).

Under any other interpreter (the main `make test`, a plain `pytest`) every test here is skipped,
with that reason, instead of failing to import vLLM: vLLM's CPU build lives in its own 3.7 GB
virtualenv and is not part of the main one. Each vLLM server takes 35-80 s to start on 2 cores, so
a run starts few: the plain reference once per session, and at most one producer/consumer pair
alive at a time.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_cases import BASELINE_PROMPTS, MAX_TOKENS

from kvxfer.integrations.vllm.testing import ServerSpec, VllmServer, token_ids
from kvxfer.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = ROOT / ".venv-vllm"
IN_VLLM_VENV = Path(sys.prefix).resolve() == VLLM_VENV.resolve()
SKIP_REASON = (
    f"vLLM tests need the interpreter of {VLLM_VENV} (this is {sys.prefix}); run `make test-vllm`"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_VLLM_VENV:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny random Llamas of one shape: "a" (the model under test) and "b" (other weights)."""
    from kvxfer.integrations.vllm.testing import build_tiny_llama

    root = tmp_path_factory.mktemp("models")
    return {name: build_tiny_llama(root / name, seed=seed) for name, seed in (("a", 0), ("b", 1))}


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each server's log (`make test-vllm` keeps them under out/vllm-tests/ after the run)."""
    path = tmp_path_factory.mktemp("vllm-logs")
    print(f"vLLM server logs: {path}")
    return path


@pytest.fixture(scope="session")
def plain_tokens(models: dict[str, Path], logs: Path) -> dict[str, list[int]]:
    """Greedy tokens of one vLLM instance without disaggregation, per prompt (each run twice:
    the baseline must itself be deterministic)."""
    with server(ServerSpec(model=models["a"], name="plain"), logs) as plain:
        runs = [{p: token_ids(plain.complete(p, max_tokens=MAX_TOKENS)) for p in BASELINE_PROMPTS}
                for _ in range(2)]
    assert runs[0] == runs[1], "plain vLLM greedy decoding is not deterministic"
    return runs[0]


@pytest.fixture(scope="session")
def curve() -> dict[str, object]:
    """CURVE key pairs of the producers (one pair, as a Secret would hold) and of the consumers."""
    from kvxfer.agents.keys import generate_keypair

    return {"producer": generate_keypair(), "consumer": generate_keypair()}


@contextlib.contextmanager
def server(spec: ServerSpec, logs: Path) -> Iterator[VllmServer]:
    """A ready and warm server for the length of a `with` block: one plain completion first, so
    that vLLM's own first-request work (seconds to tens of seconds on a busy 2-core machine) does
    not eat into a producer lease the test holds."""
    running = VllmServer(spec, logs)
    try:
        running.wait_ready()
        running.complete("warm up", max_tokens=1)
        yield running
    finally:
        running.stop()


def connector_config(role: str, curve: dict[str, object] | None = None, **extra: object) -> dict[str, object]:
    """`--kv-transfer-config` of a KvxferConnector instance: drop-in (`curve` None: no
    kv_connector_extra_config at all unless `extra`), or strict with CURVE keys given inline."""
    if curve is None:
        config: dict[str, object] = {"kv_connector": "KvxferConnector",
                                     "kv_connector_module_path": "kvxfer.integrations.vllm", "kv_role": role}
        return {**config, "kv_connector_extra_config": extra} if extra else config
    producer, consumer = curve["producer"], curve["consumer"]
    if role == "kv_producer":
        keys = {"curve_secret_key": producer.secret.decode(),
                "curve_allowed_keys": [consumer.public.decode()]}
        extra = {"side_channel_port": free_port(), **extra}
    else:
        keys = {"curve_secret_key": consumer.secret.decode(),
                "curve_server_key": producer.public.decode()}
    return {"kv_connector": "KvxferConnector", "kv_connector_module_path": "kvxfer.integrations.vllm",
            "kv_role": role, "kv_connector_extra_config": {**keys, **extra}}


def producer_spec(model: Path, name: str, curve: dict[str, object] | None, *, tp: int = 1,
                  **extra: object) -> ServerSpec:
    """A producer; `curve` None and no `extra`: the drop-in configuration (nothing but the
    connector's name)."""
    return ServerSpec(model=model, name=name, extra_args=["--tensor-parallel-size", str(tp)],
                      kv_transfer_config=connector_config("kv_producer", curve, **extra))


def consumer_spec(model: Path, name: str, curve: dict[str, object] | None, *, tp: int = 1,
                  policy: str = "fail", **extra: object) -> ServerSpec:
    config = {**connector_config("kv_consumer", curve, **extra), "kv_load_failure_policy": policy}
    return ServerSpec(model=model, name=name, extra_args=["--tensor-parallel-size", str(tp)],
                      kv_transfer_config=config)
