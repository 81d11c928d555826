"""`kvxfer proxy --backend vllm` in front of vLLM servers with KvxferConnector, for the tests
(test_proxy_vllm.py) and the longer benchmark (`make bench-vllm-proxy`, this file's `main`):
the P/D pair's launch config (one function, `connector_specs`), the proxy as a process, and
vLLM's own benchmark client (`vllm bench serve`, run through its module: the `vllm` command
fails in the CPU distribution, ../shared/NOTES.md).

    python tests/vllm/proxy_stack.py --num-prompts 64 --out out/bench-vllm-proxy
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from kvxfer.integrations.vllm.testing import ServerSpec, VllmServer, build_tiny_llama
from kvxfer.ports import free_port

# A template of the kind Hugging Face tokenizers carry; the tiny model has none of its own.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SERVED_MODEL = "tiny"  # ServerSpec's --served-model-name
START_TIMEOUT_S = 900.0  # a vLLM start: ~1 min on 2 idle cores, several when others run tests
# vLLM's benchmark client, as `vllm bench serve` runs it.
_BENCH = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
          "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
          "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


def build_chat_model(directory: Path, *, seed: int = 0) -> Path:
    """The tests' tiny random Llama, with a chat template in its tokenizer_config.json."""
    build_tiny_llama(directory, seed=seed)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}, indent=1))
    return directory


def connector_specs(model: Path, *, name: str = "") -> tuple[ServerSpec, ServerSpec]:
    """The producer and consumer vLLM servers with KvxferConnector: the one place their launch
    config is written (CURVE keys inline, READ, a failed load fails the request)."""
    from kvxfer.agents.keys import generate_keypair

    producer_keys, consumer_keys = generate_keypair(), generate_keypair()
    common = {"kv_connector": "KvxferConnector", "kv_connector_module_path": "kvxfer.integrations.vllm"}
    producer = {**common, "kv_role": "kv_producer", "kv_connector_extra_config": {
        "curve_secret_key": producer_keys.secret.decode(),
        "curve_allowed_keys": [consumer_keys.public.decode()],
        # generous: on a loaded 2-core machine decode may start loading many seconds later
        "side_channel_port": free_port(), "lease_s": 120}}
    consumer = {**common, "kv_role": "kv_consumer", "kv_load_failure_policy": "fail",
                "kv_connector_extra_config": {"curve_secret_key": consumer_keys.secret.decode(),
                                              "curve_server_key": producer_keys.public.decode(),
                                              "mode": "read"}}
    return (ServerSpec(model=model, name=f"{name}producer", kv_transfer_config=producer),
            ServerSpec(model=model, name=f"{name}consumer", kv_transfer_config=consumer))


@contextmanager
def running(spec: ServerSpec, logs: Path) -> Iterator[VllmServer]:
    server = VllmServer(spec, logs)
    try:
        server.wait_ready(START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


class ProxyProcess:
    """`kvxfer proxy` as its own process (as deployed), on a free loopback port."""

    def __init__(self, prefill: list[str], decode: list[str], logs: Path, *, backend: str = "vllm",
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / "proxy.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        cmd = [sys.executable, "-m", "kvxfer.cli", "proxy", "--backend", backend, "--port", str(self.port),
               "--prefill", *prefill, "--decode", *decode, *extra]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"proxy not ready after {timeout_s} s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@contextmanager
def pd_behind_proxy(model: Path, logs: Path) -> Iterator[ProxyProcess]:
    """A producer, a consumer and the proxy in front of them, all ready."""
    servers = [VllmServer(spec, logs) for spec in connector_specs(model)]  # both start at once
    try:
        for server in servers:
            server.wait_ready(START_TIMEOUT_S)
        producer, consumer = servers
        proxy = ProxyProcess([producer.url], [consumer.url], logs)
        try:
            proxy.wait_ready()
            yield proxy
        finally:
            proxy.stop()
    finally:
        for server in servers:
            server.stop()


def bench(url: str, model: Path, out: Path, *, label: str, num_prompts: int, input_len: int,
          output_len: int, concurrency: int, timeout_s: float = 1800.0) -> dict[str, Any]:
    """One run of vLLM's benchmark client against `url` (random prompts, greedy, EOS ignored so
    every request makes `output_len` tokens); returns its result JSON."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"{label}.json"
    args = ["--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", SERVED_MODEL, "--tokenizer", str(model), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(out), "--result-filename", name, "--disable-tqdm",
            "--label", label]
    with open(out / f"{label}.log", "wb") as log:
        done = subprocess.run([sys.executable, "-c", _BENCH, *args], stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve exited with {done.returncode}: "
                           f"{(out / f'{label}.log').read_text()[-3000:]}")
    return json.loads((out / name).read_text())


def table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of TTFT and ITL percentiles, one row per run."""
    head = ("| run | requests | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | TPOT p50 ms | "
            "output tok/s |\n|---|---|---|---|---|---|")
    rows = []
    for label, r in results.items():
        ttft = " / ".join(f"{r[f'p{p}_ttft_ms']:.1f}" for p in (50, 90, 99))
        itl = " / ".join(f"{r[f'p{p}_itl_ms']:.1f}" for p in (50, 90, 99))
        rows.append(f"| {label} | {r['completed']} ok, {r['failed']} failed | {ttft} | {itl} | "
                    f"{r['p50_tpot_ms']:.1f} | {r['output_throughput']:.1f} |")
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vLLM's benchmark client against one plain vLLM, "
                                     "then against kvxfer proxy over a KvxferConnector producer and consumer")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("out/bench-vllm-proxy"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="vllm-logs-", dir=args.out))
    model = build_chat_model(args.out / "model")
    shape = dict(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                 concurrency=args.concurrency)
    results = {}
    with running(ServerSpec(model=model, name="plain"), logs) as plain:
        results["plain vLLM"] = bench(plain.url, model, args.out, label="plain", **shape)
    with pd_behind_proxy(model, logs) as proxy:
        results["kvxfer proxy, P/D"] = bench(proxy.url, model, args.out, label="proxy", **shape)
    print(f"{args.num_prompts} prompts of {args.input_len} tokens, {args.output_len} out, "
          f"concurrency {args.concurrency}; logs in {logs}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
