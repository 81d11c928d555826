#!/usr/bin/env python3
"""Real vLLM prefill/decode on one device: KvxferConnector and vLLM's own NixlConnector, side by side.

Every vLLM instance is its own process (vLLM's AsyncLLM, the engine its OpenAI server runs; vLLM
0.25's offline `LLM` drops the KV-connector stats of steps without request outputs, which are
exactly the steps in which a load finishes). For each attention backend (--backends):
  1. plain: one instance, no connector, greedy tokens of every prompt (the check prompts twice:
     the reference must itself be deterministic);
  2. kvxfer: a producer (kv_producer) and a consumer (kv_consumer) with KvxferConnector, started
     one after the other; each prompt is prefilled on the producer (`do_remote_decode`, one token)
     and decoded on the consumer with the producer's `kv_transfer_params`, passed as vLLM's P/D
     examples pass them (`SamplingParams(extra_args={"kv_transfer_params": ...})`); tokens must
     equal the plain run's. On the first backend, a producer with other random weights then
     serves other prompts to the same consumer: every one must change its tokens;
  3. nixl (--nixl-backends): the same P/D with vLLM's NixlConnector.
Both connectors use `kv_load_failure_policy: fail` (`recompute` would hide a failed transfer
behind correct tokens).

Measured per P/D request, medians over --requests distinct prompts of TIMING_LEN tokens, after a
first request of each pair (handshakes) reported on its own: decode-side TTFT and the transfer
time, each by the connector's own report and by TTFT minus a no-transfer baseline (METHOD below,
also in the JSON and in --help).

Prints progress lines with timings, then one JSON object as the last line (also written to
$OUT/vllm_pd.json when OUT is set); exit status 1 if any check fails or any phase errs.

GPU machine (vLLM 0.25.1 CUDA build, see scripts/gpu_vllm_pd.sh):  scripts/gpu_vllm_pd.sh
Here (vLLM CPU build):  PYTHONPATH=$PWD .venv-vllm/bin/python scripts/gpu_vllm_pd.py --device cpu
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parents[1]
CHECK_LENS = (10, 17, 84, 310, 700)  # partial, just over one GPU block, several, many blocks
TIMING_LEN = 513  # 512 cached + 1: the baseline computes one token, as a consumer after a load
MAX_MODEL_LEN = 1024
KVXFER_LOADED = "kvxfer loaded request="  # the consumer's line per load: "... N bytes, ... X ms ..."
BACKEND_USED = re.compile(r"Using (?:AttentionBackendEnum\.)?([A-Z][A-Z0-9_]+) (?:attention )?backend")
_T0 = time.monotonic()


def progress(text: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f} s] {text}", flush=True)


# -- messages between this script and an instance process (one tagged union) -------------------

class InstanceSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    engine_args: dict[str, Any]  # AsyncEngineArgs keywords; kv_transfer_config as a dict
    env: dict[str, str]
    log_path: str


class Generate(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    prompt: list[int]
    max_tokens: int
    kv_transfer_params: dict[str, Any] | None = None


class Stop(msgspec.Struct, frozen=True, tag=True):
    pass


class Ready(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    startup_s: float
    versions: dict[str, str]
    backend: str | None  # what vLLM logged it uses (the CPU build logs nothing for dense models)


class Generated(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    tokens: list[int]
    finish_reason: str | None
    kv_transfer_params: dict[str, Any] | None
    ttft_ms: float
    vllm_ttft_ms: float | None
    num_cached_tokens: int | None
    kvxfer_loads: list[tuple[int, float]]  # (bytes, ms) of each "kvxfer loaded" line meanwhile
    nixl_transfers: int
    nixl_ms: float
    nixl_bytes: int


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    error: str


Message = Generate | Stop | Ready | Generated | Failed
_decoder = msgspec.msgpack.Decoder(Message)


# -- the instance process -----------------------------------------------------------------------

def instance_main(spec_bytes: bytes, conn: Any) -> None:
    """Entry of an instance process: its own process group (so the engine processes vLLM spawns
    can be ended with it), stdout/stderr into its log, then serve Generate until Stop."""
    os.setpgrp()
    spec = msgspec.msgpack.decode(spec_bytes, type=InstanceSpec)
    fd = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(spec.env)  # before vLLM is imported: it reads some variables at import
    try:
        asyncio.run(_serve(spec, conn))
    except BaseException as err:  # reported to the parent, which names the instance and log
        with contextlib.suppress(OSError):
            conn.send_bytes(msgspec.msgpack.encode(Failed(error=f"{type(err).__name__}: {err}")))
        raise


async def _serve(spec: InstanceSpec, conn: Any) -> None:
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    start = time.monotonic()
    args = dict(spec.engine_args)
    if args.get("kv_transfer_config") is not None:
        args["kv_transfer_config"] = KVTransferConfig(**args["kv_transfer_config"])
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
    try:
        used = BACKEND_USED.findall(Path(spec.log_path).read_text(errors="replace"))
        conn.send_bytes(msgspec.msgpack.encode(Ready(
            startup_s=time.monotonic() - start, versions=_versions(), backend=used[-1] if used else None)))
        loop = asyncio.get_running_loop()
        while True:  # the pipe is read off the event loop: vLLM's output handler runs on it
            msg = _decoder.decode(await loop.run_in_executor(None, conn.recv_bytes))
            if isinstance(msg, Stop):
                return
            conn.send_bytes(msgspec.msgpack.encode(await _generate(engine, msg, Path(spec.log_path))))
    finally:
        engine.shutdown()


def _versions() -> dict[str, str]:
    import torch
    import vllm
    from vllm.platforms import current_platform

    # The platform's name comes from NVML on CUDA: no CUDA context in this (frontend) process.
    return {"vllm": str(vllm.__version__), "torch": str(torch.__version__),
            "device": str(current_platform.get_device_name(0)), "python": sys.version.split()[0]}


async def _generate(engine: Any, msg: Generate, log: Path) -> Generated:
    from vllm import SamplingParams

    extra = None if msg.kv_transfer_params is None else {"kv_transfer_params": msg.kv_transfer_params}
    params = SamplingParams(temperature=0.0, max_tokens=msg.max_tokens, ignore_eos=True, extra_args=extra)
    log_offset, nixl_before = log.stat().st_size, _nixl_totals()
    start, first, final = time.perf_counter(), None, None
    async for out in engine.generate({"prompt_token_ids": msg.prompt}, params, uuid.uuid4().hex):
        if first is None and out.outputs and out.outputs[0].token_ids:
            first = time.perf_counter()
        final = out
    nixl = [a - b for a, b in zip(_nixl_totals(), nixl_before, strict=True)]
    with log.open("rb") as f:
        f.seek(log_offset)
        loads = [_load_of(line) for line in f.read().decode(errors="replace").splitlines()
                 if KVXFER_LOADED in line]
    completion = final.outputs[0]
    metrics = getattr(final, "metrics", None)
    vllm_ttft = getattr(metrics, "first_token_latency", None)
    return Generated(
        tokens=list(completion.token_ids), finish_reason=completion.finish_reason,
        kv_transfer_params=final.kv_transfer_params, ttft_ms=((first or time.perf_counter()) - start) * 1e3,
        vllm_ttft_ms=vllm_ttft * 1e3 if vllm_ttft else None, num_cached_tokens=final.num_cached_tokens,
        kvxfer_loads=loads, nixl_transfers=int(nixl[0]), nixl_ms=nixl[1] * 1e3, nixl_bytes=int(nixl[2]))


def _load_of(line: str) -> tuple[int, float]:
    num_bytes, ms = re.search(r"(\d+) bytes", line), re.search(r"([\d.]+) ms", line)
    return (int(num_bytes.group(1)) if num_bytes else 0, float(ms.group(1)) if ms else float("nan"))


def _nixl_totals() -> tuple[float, float, float]:
    """(transfers, seconds, bytes) NIXL reported so far, from vLLM's Prometheus histograms."""
    from vllm.v1.metrics.reader import Histogram, get_metrics_snapshot

    hist = {m.name: m for m in get_metrics_snapshot() if isinstance(m, Histogram)}
    xfer, size = hist.get("vllm:nixl_xfer_time_seconds"), hist.get("vllm:nixl_bytes_transferred")
    return (xfer.count if xfer else 0, xfer.sum if xfer else 0.0, size.sum if size else 0.0)


# -- driving instances from this script ---------------------------------------------------------

class InstanceError(Exception):
    """An instance failed, hung or exited; the message names it and ends with its log's tail."""


class Instance:
    """A running instance process: `generate` one request at a time, `stop` ends its group."""

    def __init__(self, spec: InstanceSpec, request_timeout_s: float, ends_at: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.spec, self._timeout, self._ends_at = spec, request_timeout_s, ends_at
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=instance_main, args=(msgspec.msgpack.encode(spec), child),
                                name=spec.name)
        self.proc.start()
        child.close()

    def wait_ready(self, timeout_s: float) -> Ready:
        ready = self._recv(timeout_s)
        if not isinstance(ready, Ready):
            raise InstanceError(f"{self.spec.name}: expected Ready, got {ready}")
        return ready

    def generate(self, prompt: list[int], max_tokens: int,
                 kv_transfer_params: dict[str, Any] | None = None) -> Generated:
        self._conn.send_bytes(msgspec.msgpack.encode(Generate(
            prompt=prompt, max_tokens=max_tokens, kv_transfer_params=kv_transfer_params)))
        out = self._recv(self._timeout)
        if not isinstance(out, Generated) or out.finish_reason != "length" or len(out.tokens) != max_tokens:
            raise InstanceError(f"{self.spec.name}: request ended early: {out}\n{self.log_tail()}")
        return out

    def _recv(self, timeout_s: float) -> Message:
        timeout_s = min(timeout_s, self._ends_at - time.monotonic())  # the whole run's budget first
        try:
            if not self._conn.poll(max(timeout_s, 0.0)):
                raise InstanceError(f"{self.spec.name}: no answer in {timeout_s:.0f} s\n{self.log_tail()}")
            msg = _decoder.decode(self._conn.recv_bytes())
        except (EOFError, OSError) as err:
            self.proc.join(5)
            raise InstanceError(f"{self.spec.name}: exited ({self.proc.exitcode}): {err!r}\n"
                                f"{self.log_tail()}") from None
        if isinstance(msg, Failed):
            raise InstanceError(f"{self.spec.name}: {msg.error}\n{self.log_tail()}")
        return msg

    def stop(self) -> None:
        if self._conn.closed:
            return
        with contextlib.suppress(OSError):
            self._conn.send_bytes(msgspec.msgpack.encode(Stop()))
        self.proc.join(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftover engine processes of this instance
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self._conn.close()

    def log_tail(self, num_bytes: int = 4000) -> str:
        data = Path(self.spec.log_path).read_bytes()[-num_bytes:]
        return f"--- last {len(data)} bytes of {self.spec.log_path} ---\n{data.decode(errors='replace')}"


class Prompts(msgspec.Struct, frozen=True, kw_only=True):
    check: dict[str, list[int]]  # P/D tokens compared with plain
    control: dict[str, list[int]]  # the other-weights producer's prompts (never seen by the consumer)
    timing: dict[str, list[int]]  # distinct prompts of TIMING_LEN tokens, one P/D request each


def make_prompts(vocab_size: int, num_timing: int, seed: int = 7) -> Prompts:
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(n)]  # 0-2 are the special tokens
    return Prompts(check={f"len{n}": ids(n) for n in CHECK_LENS},
                   control={f"control-len{n}": ids(n) for n in CHECK_LENS},
                   timing={f"timing{i}": ids(TIMING_LEN) for i in range(num_timing)})


def kvxfer_transfer_config(role: str, form: str, keys: dict[str, Any]) -> dict[str, Any]:
    """KvxferConnector's kv_transfer_config, the one place it is written. `dropin`: nothing but the
    class, module and role (the producer listens on its default port, its key travels in
    kv_transfer_params); `curve`: pre-shared CURVE keys on both sides (the strict mode) and a free
    side-channel port; `plaintext`: no CURVE, loopback only."""
    from kvxfer.ports import free_port

    config: dict[str, Any] = {"kv_connector": "KvxferConnector",
                              "kv_connector_module_path": "kvxfer.integrations.vllm",
                              "kv_role": role, "kv_load_failure_policy": "fail"}
    if form == "dropin":
        return config
    extra: dict[str, Any] = {"side_channel_port": free_port()} if role == "kv_producer" else {}
    if form == "plaintext":
        extra["insecure_plaintext"] = True
    elif role == "kv_producer":
        extra |= {"curve_secret_key": keys["producer"].secret.decode(),
                  "curve_allowed_keys": [keys["consumer"].public.decode()]}
    else:
        extra |= {"curve_secret_key": keys["consumer"].secret.decode(),
                  "curve_server_key": keys["producer"].public.decode()}
    return {**config, "kv_connector_extra_config": extra}


def nixl_transfer_config(role: str, device: str) -> dict[str, Any]:
    return {"kv_connector": "NixlConnector", "kv_role": role, "kv_load_failure_policy": "fail",
            "kv_buffer_device": "cuda" if device == "cuda" else "cpu"}


class Setup(msgspec.Struct, frozen=True, kw_only=True):
    """What every instance of this run shares; `spec` makes one instance of it."""

    device: str
    gpu_memory_utilization: float
    log_dir: str
    startup_timeout_s: float
    request_timeout_s: float
    ends_at: float  # monotonic time by which the run must be printing its JSON (--time-budget)
    kvxfer_form: str

    def spec(self, name: str, model: Path, backend: str, transfer: dict[str, Any] | None) -> InstanceSpec:
        args: dict[str, Any] = {
            "model": str(model), "dtype": "bfloat16" if self.device == "cuda" else "float32",
            "enforce_eager": True, "max_model_len": MAX_MODEL_LEN, "max_num_seqs": 8, "seed": 0,
            "disable_log_stats": False, "kv_transfer_config": transfer}
        if self.device == "cpu":
            env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        else:
            # vLLM 0.25 picks the backend from attention_backend only; the variable is for older ones.
            args |= {"gpu_memory_utilization": self.gpu_memory_utilization,
                     "enable_flashinfer_autotune": False, "attention_backend": backend}
            env = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_ATTENTION_BACKEND": backend}
            if backend == "FLASHINFER":
                env["VLLM_KV_CACHE_LAYOUT"] = "HND"
        if transfer is not None and transfer["kv_connector"] == "NixlConnector":
            from kvxfer.ports import free_port

            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port())  # each instance binds one in 0.25
        return InstanceSpec(name=name, engine_args=args, env=env, log_path=f"{self.log_dir}/{name}.log")

    @contextlib.contextmanager
    def running(self, spec: InstanceSpec, into: dict[str, Any]) -> Iterator[Instance]:
        """A ready instance for a `with` block; its start-up time and versions go into `into`."""
        progress(f"{spec.name}: starting (log {spec.log_path})")
        start = time.monotonic()
        if self.ends_at - time.monotonic() < 15:
            raise InstanceError(f"{spec.name}: not started, --time-budget spent")
        inst = Instance(spec, self.request_timeout_s, self.ends_at)
        try:
            ready = inst.wait_ready(self.startup_timeout_s)
            took = time.monotonic() - start
            progress(f"{spec.name}: up in {took:.1f} s (engine {ready.startup_s:.1f} s), backend {ready.backend}")
            into.setdefault("instances", {})[spec.name] = {
                "startup_s": round(took, 1), "engine_startup_s": round(ready.startup_s, 1),
                "backend_used": ready.backend}
            into["versions"] = ready.versions
            yield inst
        finally:
            inst.stop()
            progress(f"{spec.name}: stopped")


class Report:
    """Every check and every figure of the run; `ok` only if every check passed and nothing failed."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.data: dict[str, Any] = {**meta, "checks": [], "errors": [], "plain": {}, "pd": {}}

    def check(self, name: str, ok: bool, **detail: Any) -> bool:
        self.data["checks"].append({"name": name, "ok": bool(ok), **detail})
        progress(f"{'PASS' if ok else 'FAIL'} {name}")
        return bool(ok)

    def tokens(self, what: str, key: str, got: list[int], want: list[int], *, equal: bool = True) -> bool:
        mismatch = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        same = got == want
        detail = {} if same == equal else {"got": got, "want": want}
        return self.check(f"{what} {key}: tokens {'equal' if equal else 'differ from'} plain",
                          same == equal, first_mismatch=mismatch, **detail)

    def failed(self, phase: str, err: BaseException) -> None:
        self.data["errors"].append({"phase": phase, "error": f"{type(err).__name__}: {err}"})
        progress(f"ERROR in {phase}: {type(err).__name__}: {err}")

    @property
    def ok(self) -> bool:
        return not self.data["errors"] and all(c["ok"] for c in self.data["checks"])


def run_plain(setup: Setup, model: Path, backend: str, prompts: Prompts, max_tokens: int,
              report: Report) -> dict[str, list[int]]:
    """Greedy tokens of one instance without a connector, for every prompt."""
    out: dict[str, Any] = report.data["plain"].setdefault(backend, {})
    with setup.running(setup.spec(f"plain-{backend}", model, backend, None), out) as inst:
        every = {**prompts.check, **prompts.control, **prompts.timing}
        runs = {key: inst.generate(p, max_tokens) for key, p in every.items()}
        again = {key: inst.generate(p, max_tokens).tokens for key, p in prompts.check.items()}
    report.check(f"plain {backend}: greedy tokens deterministic",
                 all(again[k] == runs[k].tokens for k in again))
    out["ttft_ms_median_local_prefill"] = _median(runs[k].ttft_ms for k in prompts.timing)
    return {key: r.tokens for key, r in runs.items()}


def prefill_then_decode(producer: Instance, consumer: Instance, prompt: list[int],
                        max_tokens: int) -> Generated:
    """What a two-step P/D proxy does: one token on the producer with `do_remote_decode`, then the
    prompt on the consumer with the `kv_transfer_params` the producer returned."""
    first = producer.generate(prompt, 1, {"do_remote_decode": True})
    if not first.kv_transfer_params:
        raise InstanceError(f"{producer.spec.name} returned no kv_transfer_params")
    return consumer.generate(prompt, max_tokens, first.kv_transfer_params)


class Pair(msgspec.Struct, frozen=True, kw_only=True):
    connector: str  # "kvxfer" or "nixl"
    backend: str
    control: bool  # also run the other-weights producer


def run_pd(setup: Setup, pair: Pair, models: dict[str, Path], prompts: Prompts, plain: dict[str, list[int]],
           max_tokens: int, report: Report) -> None:
    what = f"{pair.connector} {pair.backend}"
    out: dict[str, Any] = report.data["pd"].setdefault(f"{pair.connector}-{pair.backend}", {})
    config = _config_maker(setup, pair.connector)
    name = f"{pair.connector}-{pair.backend}"
    with setup.running(setup.spec(f"{name}-producer", models["a"], pair.backend, config("kv_producer")), out) as prod, \
         setup.running(setup.spec(f"{name}-consumer", models["a"], pair.backend, config("kv_consumer")), out) as cons:
        checked = {key: prefill_then_decode(prod, cons, p, max_tokens) for key, p in prompts.check.items()}
        for key, got in checked.items():
            report.tokens(what, key, got.tokens, plain[key])
        first_key = next(iter(checked))
        out["first_request"] = {"prompt_tokens": len(prompts.check[first_key]),
                                **_figures([checked[first_key]], [])}
        # Each baseline right after its P/D request (same machine load), with the same sampling
        # parameters: only where the KV comes from differs.
        measured = [(prefill_then_decode(prod, cons, p, max_tokens), cons.generate(p, max_tokens))
                    for p in prompts.timing.values()]
        timed, base = [t for t, _ in measured], [b for _, b in measured]
        for key, got in zip(prompts.timing, timed, strict=True):
            report.tokens(what, key, got.tokens, plain[key])
        report.check(f"{what}: baseline (prefix cache) tokens equal plain for every timing prompt",
                     all(b.tokens == plain[k] for k, b in zip(prompts.timing, base, strict=True)))
        _check_transferred(report, what, pair.connector, [*checked.values(), *timed])
        out["timing"] = _figures(timed, base)
        progress(f"{what}: {json.dumps(out['timing'])}")
        if pair.control:
            prod.stop()
            _negative_control(setup, pair, models["b"], cons, prompts, plain, max_tokens, config, report, out)


def _config_maker(setup: Setup, connector: str) -> Any:
    if connector == "nixl":
        return lambda role: nixl_transfer_config(role, setup.device)
    from kvxfer.agents.keys import generate_keypair

    keys = {"producer": generate_keypair(), "consumer": generate_keypair()}
    return lambda role: kvxfer_transfer_config(role, setup.kvxfer_form, keys)


def _negative_control(setup: Setup, pair: Pair, model_b: Path, cons: Instance, prompts: Prompts,
                      plain: dict[str, list[int]], max_tokens: int, config: Any, report: Report,
                      out: dict[str, Any]) -> None:
    """A producer with other weights: the consumer's tokens must change for every prompt, which
    they cannot if it decoded from anything but the transferred KV."""
    spec = setup.spec(f"{pair.connector}-{pair.backend}-producer-other-weights", model_b,
                      pair.backend, config("kv_producer"))
    with setup.running(spec, out) as other:
        for key, p in prompts.control.items():
            got = prefill_then_decode(other, cons, p, max_tokens)
            report.tokens(f"{pair.connector} {pair.backend} other-weights producer", key,
                          got.tokens, plain[key], equal=False)


def _check_transferred(report: Report, what: str, connector: str, results: list[Generated]) -> None:
    if connector == "kvxfer":
        counts = [len(r.kvxfer_loads) for r in results]
        report.check(f"{what}: one 'kvxfer loaded' line per P/D request", counts == [1] * len(counts),
                     lines_per_request=counts)
    elif any(r.nixl_transfers for r in results):  # vLLM reports NIXL telemetry: it must cover every one
        counts = [r.nixl_transfers for r in results]
        report.check(f"{what}: NIXL telemetry of a transfer in every P/D request", all(counts),
                     transfers_per_request=counts)


def _figures(pd: list[Generated], base: list[Generated]) -> dict[str, Any]:
    fig: dict[str, Any] = {"num_requests": len(pd),
                           "ttft_ms": _median(r.ttft_ms for r in pd),
                           "vllm_ttft_ms": _median(r.vllm_ttft_ms for r in pd if r.vllm_ttft_ms)}
    if base:
        fig |= {"baseline_ttft_ms": _median(r.ttft_ms for r in base),
                "baseline_cached_tokens": _median(r.num_cached_tokens for r in base if r.num_cached_tokens is not None),
                "transfer_by_ttft_ms": _median(p.ttft_ms - b.ttft_ms for p, b in zip(pd, base, strict=True))}
    loads = [ld for r in pd for ld in r.kvxfer_loads]
    if loads:
        fig |= {"transfer_log_ms": _median(ms for _, ms in loads), "bytes": _median(b for b, _ in loads)}
    nixl = [r for r in pd if r.nixl_transfers]
    if nixl:
        fig |= {"transfer_nixl_ms": _median(r.nixl_ms / r.nixl_transfers for r in nixl),
                "nixl_transfers_per_request": _median(r.nixl_transfers for r in nixl),
                "bytes": _median(r.nixl_bytes for r in nixl)}
    return fig


def _median(values: Any) -> float | None:
    items = list(values)
    return round(statistics.median(items), 3) if items else None


METHOD = {
    "ttft_ms": "decode side: consumer request start to first output token, in the consumer process "
               "around AsyncLLM.generate (vllm_ttft_ms: vLLM's own first_token_latency)",
    "baseline_ttft_ms": "the same prompt sent again to the same consumer without kv_transfer_params: "
                        "all but its last token then come from its prefix cache "
                        "(baseline_cached_tokens), so it computes one token, as after a transfer",
    "transfer_by_ttft_ms": "per request, ttft_ms minus baseline_ttft_ms; median",
    "transfer_log_ms": "kvxfer: the consumer's 'kvxfer loaded request=... ms' line; median",
    "transfer_nixl_ms": "nixl: NIXL telemetry per transfer, growth of vLLM's vllm:nixl_xfer_time_seconds "
                        "histogram (sum/count) across the request; median",
    "first_request": "the first P/D request of a pair (handshakes included), not in the medians",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    epilog = "figures:\n" + "\n".join(f"  {k}: {v}" for k, v in METHOD.items())
    p = argparse.ArgumentParser(description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="%(default)s")
    p.add_argument("--backends", help="attention backends, comma-separated (default: FLASHINFER,"
                   "FLASH_ATTN on cuda; CPU_ATTN on cpu, chosen by vLLM)")
    p.add_argument("--nixl-backends", help="backends with a NixlConnector pair too (default: "
                   "FLASHINFER on cuda, CPU_ATTN on cpu; '' for none)")
    p.add_argument("--skip-kvxfer", action="store_true", help="only plain and NixlConnector runs")
    p.add_argument("--kvxfer-config", choices=("dropin", "curve", "plaintext"), default="dropin",
                   help="KvxferConnector settings: none at all (the drop-in form), pre-shared CURVE keys "
                        "(the strict mode), or insecure_plaintext on loopback")
    p.add_argument("--requests", type=int, help="timed P/D requests per pair (default 20 cuda, 3 cpu)")
    p.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per request (%(default)s)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.2, help="per instance (%(default)s)")
    p.add_argument("--startup-timeout", type=float, help="seconds per instance start (default 420 "
                   "cuda, 1800 cpu: a shared 2-core machine takes minutes)")
    p.add_argument("--request-timeout", type=float, default=90.0, help="seconds per request (%(default)s)")
    p.add_argument("--time-budget", type=float, help="seconds for the whole run, after which what is "
                   "left is skipped and the JSON printed (default 480 on cuda: the GPU machine ends a "
                   "command after 600 s; none on cpu)")
    p.add_argument("--log-dir", type=Path, help="instance logs (default $OUT/vllm_pd_logs, else a temp dir)")
    p.add_argument("--json", type=Path, help="also write the JSON here (default $OUT/vllm_pd.json if OUT is set)")
    return p.parse_args(argv)


def build_models(root: Path) -> tuple[dict[str, Path], int]:
    """Two tiny random GQA Llamas of one shape (head_dim 64: both GPU backends take it): "a" and
    "b" with other weights. Returns them and the vocabulary size."""
    from kvxfer.integrations.vllm.testing import TinyLlama, build_tiny_llama

    shape = TinyLlama(head_dim=64)
    models = {name: build_tiny_llama(root / name, seed=seed, shape=shape) for name, seed in (("a", 0), ("b", 1))}
    vocab = json.loads((models["a"] / "config.json").read_text())["vocab_size"]
    return models, int(vocab)


def run_all(args: argparse.Namespace, setup: Setup, report: Report) -> None:
    default = ("FLASHINFER,FLASH_ATTN", "FLASHINFER") if args.device == "cuda" else ("CPU_ATTN", "CPU_ATTN")
    backends = [b for b in (args.backends or default[0]).split(",") if b]
    nixl_backends = [b for b in (default[1] if args.nixl_backends is None else args.nixl_backends).split(",") if b]
    with tempfile.TemporaryDirectory(prefix="vllm-pd-models-") as tmp:
        models, vocab = build_models(Path(tmp))
        prompts = make_prompts(vocab, args.requests or (20 if args.device == "cuda" else 3))
        progress(f"models built (vocab {vocab}); backends {backends}, nixl on {nixl_backends}")
        for i, backend in enumerate(backends):
            try:
                plain = run_plain(setup, models["a"], backend, prompts, args.max_tokens, report)
            except Exception as err:  # noqa: BLE001 (each phase is reported; the others still run)
                report.failed(f"plain {backend}", err)
                continue
            pairs = [] if args.skip_kvxfer else [Pair(connector="kvxfer", backend=backend, control=i == 0)]
            pairs += [Pair(connector="nixl", backend=backend, control=False)] if backend in nixl_backends else []
            for pair in pairs:
                try:
                    run_pd(setup, pair, models, prompts, plain, args.max_tokens, report)
                except Exception as err:  # noqa: BLE001
                    report.failed(f"{pair.connector} {pair.backend}", err)


def side_by_side(report: Report) -> dict[str, Any]:
    """kvxfer and nixl on each backend both ran on: the headline figures next to each other."""
    keys = ("ttft_ms", "baseline_ttft_ms", "transfer_by_ttft_ms", "transfer_log_ms", "transfer_nixl_ms", "bytes")
    pd = report.data["pd"]
    rows = {}
    for name, figs in pd.items():
        connector, backend = name.split("-", 1)
        rows.setdefault(backend, {})[connector] = {k: figs.get("timing", {}).get(k) for k in keys}
    return {b: r for b, r in rows.items() if len(r) == 2}


def check_backends(report: Report) -> None:
    """On CUDA every instance must have run the backend asked for (vLLM logs its choice)."""
    for backend_key, entry in [*report.data["plain"].items(), *report.data["pd"].items()]:
        backend = backend_key.split("-", 1)[-1]
        for name, inst in entry.get("instances", {}).items():
            report.check(f"{name}: vLLM used the {backend} backend", inst["backend_used"] == backend,
                         backend_used=inst["backend_used"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = os.environ.get("OUT")
    log_dir = args.log_dir or (Path(out_dir) / "vllm_pd_logs" if out_dir else Path(tempfile.mkdtemp(prefix="vllm-pd-logs-")))
    log_dir.mkdir(parents=True, exist_ok=True)
    # vLLM's engine processes import the connector by module path: the repository must be on their path.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, str(ROOT))
    setup = Setup(device=args.device, gpu_memory_utilization=args.gpu_memory_utilization,
                  log_dir=str(log_dir),
                  startup_timeout_s=args.startup_timeout or (420.0 if args.device == "cuda" else 1800.0),
                  request_timeout_s=args.request_timeout, kvxfer_form=args.kvxfer_config,
                  ends_at=_T0 + (args.time_budget or (480.0 if args.device == "cuda" else float("inf"))))
    report = Report({"device": args.device, "kvxfer_config": args.kvxfer_config, "max_tokens": args.max_tokens,
                     "timing_prompt_tokens": TIMING_LEN, "check_prompt_tokens": list(CHECK_LENS),
                     "log_dir": str(log_dir), "method": METHOD})
    try:
        run_all(args, setup, report)
    except Exception as err:  # noqa: BLE001 (the JSON line is printed whatever happened)
        report.failed("setup", err)
    if args.device == "cuda":
        check_backends(report)
    report.data |= {"side_by_side": side_by_side(report), "elapsed_s": round(time.monotonic() - _T0, 1),
                    "ok": report.ok}
    line = json.dumps(report.data)
    target = args.json or (Path(out_dir) / "vllm_pd.json" if out_dir else None)
    if target is not None:
        target.write_text(line + "\n")
    progress(f"{'OK' if report.ok else 'FAILED'}: {sum(c['ok'] for c in report.data['checks'])}/"
             f"{len(report.data['checks'])} checks, {len(report.data['errors'])} errors")
    print(line, flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
