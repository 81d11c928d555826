"""The cpu-demo overlay, run without a cluster: each Deployment's container command and environment
(rendered by `kubectl kustomize`) starts as a local process on loopback, with CURVE keys from
`kvxfer keys generate` laid out as the pods' Secret volumes would be. A completion through the
proxy must equal a single-process run of the same model, token for token, and every process must
exit within its pod's terminationGracePeriodSeconds after SIGTERM.

What differs from a pod, and only this: addresses are 127.0.0.1 (pod IP and Service names),
ports are free ones of this machine (other tests may hold 8100 or 5600), and mounted files live
under a temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("kvxfer.commands.serve")  # `kvxfer serve prefill|decode`
pytest.importorskip("kvxfer.commands.proxy")  # `kvxfer proxy`
pytest.importorskip("kvxfer.commands.keys")  # `kvxfer keys generate`
httpx = pytest.importorskip("httpx")

from test_deploy import (  # noqa: E402
    SECRET_KEYS,
    _containers,
    _secret_files,
    config_of,
    needs_kubectl,
    of_kind,
    render,
    resolve_env,
)

from kvxfer.daemons.config import ServeConfig  # noqa: E402
from kvxfer.ports import free_ports  # noqa: E402

pytestmark = [pytest.mark.slow, needs_kubectl, pytest.mark.timeout(900)]

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19]
MAX_TOKENS = 8
READY_TIMEOUT_S = 420.0
ORDER = ("kvxfer-prefill", "kvxfer-decode", "kvxfer-proxy")


def kvxfer_command() -> list[str]:
    script = Path(sys.executable).parent / "kvxfer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kvxfer.cli"]


def generate_keys(directory: Path) -> dict[str, str]:
    for name in ("prefill", "decode"):
        subprocess.run([*kvxfer_command(), "keys", "generate", "--out", str(directory), "--name", name],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
    return {key: (directory / key).read_text().strip() for key in SECRET_KEYS}


def local_env(deployment: dict, container: dict, keys: Path, root: Path, ports: dict[str, int]) -> dict[str, str]:
    """The container's environment for a local process: Secret files copied under `root`, paths
    into them rewritten, addresses on loopback, ports free ones."""
    name = deployment["metadata"]["name"]
    env = resolve_env(container, pod_name=f"{name}-local", pod_ip="127.0.0.1",
                      secret={key: (keys / key).read_text().strip() for key in SECRET_KEYS})  # fmt: skip
    mounts = {f"{root}{path}": key for path, key in _secret_files(deployment, container).items()}
    for local, key in mounts.items():
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(keys / key, local)
    for mount in container.get("volumeMounts", []):
        for var, value in env.items():
            if value.startswith(mount["mountPath"] + "/") and mount["mountPath"].startswith("/etc/"):
                env[var] = f"{root}{value}"
    env["KVXFER_HOST"] = "127.0.0.1"
    env["KVXFER_PORT"] = str(ports[name])
    if "KVXFER_SIDE_CHANNEL_PORT" in env:
        env["KVXFER_SIDE_CHANNEL_PORT"] = str(ports[f"{name}/side"])
    for var, service in (("KVXFER_PREFILL", "kvxfer-prefill"), ("KVXFER_DECODE", "kvxfer-decode")):
        if var in env:
            env[var] = f"http://127.0.0.1:{ports[service]}"
    return env


def wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url}: exited with {process.returncode} before /ready:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    pytest.fail(f"{url}: not ready within {READY_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}")


def reference_tokens(config: ServeConfig) -> list[int]:
    """The same model in one process (TP 1): what every disaggregated answer must equal."""
    from kvxfer.engine import CacheConfig, Engine, EngineConfig, preset

    engine = Engine(EngineConfig(model=preset(config.preset), cache=CacheConfig(num_blocks=64),
                                 dtype=config.dtype, device="cpu", seed=config.seed))  # fmt: skip
    return list(engine.generate(PROMPT, MAX_TOKENS).tokens)


def check_metrics(ports: dict[str, int], *, lease_s: float) -> None:
    """What Prometheus scrapes at the annotated ports: transfer bytes counted, and no block still
    held once the request's leases are released (or, at the latest, expired)."""
    def scrape(name: str) -> str:
        return httpx.get(f"http://127.0.0.1:{ports[name]}/metrics", timeout=5.0).text

    moved = sum(_samples(scrape(name), "kvxfer_transfer_bytes_total") for name in ORDER[:2])
    assert moved > 0 and "kvxfer_proxy_request" in scrape("kvxfer-proxy")
    assert all("\nkvxfer_blocks_held " in scrape(name) for name in ORDER[:2])
    deadline = time.monotonic() + lease_s + 10.0
    while any(_samples(scrape(name), "kvxfer_blocks_held") for name in ORDER[:2]):
        assert time.monotonic() < deadline, "blocks still held after the lease"
        time.sleep(0.5)


def _samples(text: str, metric: str) -> float:
    """The sum of a metric's samples (every label set) in Prometheus text format."""
    pattern = rf"^{metric}(?:{{[^}}]*}})? (\S+)$"
    return sum(float(value) for value in re.findall(pattern, text, flags=re.M))


def stop(process: subprocess.Popen, grace_s: float) -> float:
    """SIGTERM the process group this test started; SIGKILL it after `grace_s`, as the kubelet
    would. Returns the seconds it took to exit."""
    started = time.monotonic()
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            return float("inf")
    return time.monotonic() - started


def test_cpu_demo_entrypoints_answer_through_the_proxy(tmp_path):
    deployments = of_kind(render("overlays/cpu-demo"), "Deployment")
    keys = tmp_path / "keys"
    generate_keys(keys)
    ports: dict[str, int] = {}
    for name in ORDER:
        container = _containers(deployments[name])[0]
        ports[name] = free_ports(1)
        config = config_of(container)
        if isinstance(config, ServeConfig):
            ports[f"{name}/side"] = free_ports(config.tp)
    processes: dict[str, tuple[subprocess.Popen, float]] = {}
    try:
        for name in ORDER:
            deployment = deployments[name]
            container = _containers(deployment)[0]
            env = local_env(deployment, container, keys, tmp_path / name, ports)
            log = tmp_path / f"{name}.log"
            process_env = {k: v for k, v in os.environ.items() if not k.startswith("KVXFER_")}
            process_env |= env | {"OMP_NUM_THREADS": "1"}
            with log.open("w") as out:
                process = subprocess.Popen([*kvxfer_command(), *container["args"]], env=process_env,
                                           stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            processes[name] = (process, deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
            wait_ready(f"http://127.0.0.1:{ports[name]}", process, log)

        reply = httpx.post(f"http://127.0.0.1:{ports['kvxfer-proxy']}/v1/completions",
                           json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0}, timeout=300.0)  # fmt: skip
        assert reply.status_code == 200, reply.text
        body = reply.json()
        decode = config_of(_containers(deployments["kvxfer-decode"])[0])
        assert body["choices"][0]["token_ids"] == reference_tokens(decode)
        assert body["kvxfer"]["bytes"] > 0 and body["kvxfer"]["peers"] >= 1  # the KV did move
        check_metrics(ports, lease_s=decode.lease_s)
    finally:
        exits = {name: stop(process, grace) for name, (process, grace) in reversed(processes.items())}
    assert all(seconds != float("inf") for seconds in exits.values()), exits
