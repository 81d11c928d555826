"""Test support for the vLLM plugin: a tiny random Llama directory and vLLM OpenAI servers driven
over HTTP the way a two-step P/D proxy drives them.

Nothing here is needed to run the connector; the tests (tests/vllm/) and the README's example use
it. Building a model needs `transformers` and `tokenizers`; running servers needs vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kvxfer.ports import free_port

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the key and value cache in fixed-size blocks.",
    "Prefill workers compute the cache; decode workers read it and generate tokens.",
    "A lease holds blocks until every consumer confirms or the deadline passes.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}",
]


@dataclass(frozen=True)
class TinyLlama:
    """Shape of the random model: small enough to load in seconds, big enough to use GQA
    (2 KV heads under 4 query heads) and a head size vLLM's CPU attention supports."""

    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    vocab_size: int = 384
    max_positions: int = 1024
    init_std: float = 0.08  # larger than usual: peaked logits keep greedy decoding stable


def build_tokenizer(directory: Path, vocab_size: int) -> int:
    """Train a byte-level BPE tokenizer offline and save it; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": 1024,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return tok.get_vocab_size()


def build_tiny_llama(directory: Path, *, seed: int, shape: TinyLlama = TinyLlama()) -> Path:
    """A Llama model directory with random weights (safetensors) and its own tokenizer.

    Same `shape`, different `seed`: same architecture, different weights (a negative control).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(directory, shape.vocab_size)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        initializer_range=shape.init_std,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@dataclass
class ServerSpec:
    """One vLLM OpenAI server, optionally with a KV connector: on loopback unless `host` and
    `launcher` put it elsewhere (a host of kvxfer.hosts: its address, and `Host.pod_command([])`;
    the caller then talks to it from inside that host's network)."""

    model: Path
    name: str
    kv_transfer_config: dict[str, Any] | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    kv_cache_gib: int = 1
    host: str = "127.0.0.1"  # HTTP binds it; clients dial it
    launcher: list[str] = field(default_factory=list)  # argv prefix the server runs under

    def command(self, port: int) -> list[str]:
        cmd = [
            *self.launcher, sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
            "--model", str(self.model), "--served-model-name", "tiny",
            "--host", self.host, "--port", str(port),
            "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8",
            "--enforce-eager", "--seed", "0", "--disable-log-stats",
        ]
        if self.kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(self.kv_transfer_config)]
        return cmd + self.extra_args


class ServerError(Exception):
    """A non-200 answer from a vLLM server, with its body."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {body[:2000]}")


class VllmServer:
    """A running server: `complete` sends one request; `kill` is SIGKILL of its process group."""

    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.url = f"http://{spec.host}:{self.port}"
        self.log_path = log_dir / f"{spec.name}.log"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib),
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", **spec.env}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop/kill)
        self.proc = subprocess.Popen(spec.command(self.port), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline, pause = time.monotonic() + timeout_s, 0.2
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server {self.spec.name} exited with {self.proc.returncode}"
                                   f"; log tail:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(pause)
            pause = min(pause * 1.5, 2.0)
        raise TimeoutError(f"vLLM server {self.spec.name} not ready after {timeout_s} s; "
                           f"log tail:\n{self.log_tail()}")

    def complete(self, prompt: str, *, max_tokens: int,
                 kv_transfer_params: dict[str, Any] | None = None,
                 timeout_s: float = 120.0) -> dict[str, Any]:
        """One greedy completion; returns the JSON response (or raises on HTTP errors)."""
        body: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0.0, "ignore_eos": True,
                                "return_token_ids": True}
        if kv_transfer_params is not None:
            body["kv_transfer_params"] = kv_transfer_params
        r = httpx.post(f"{self.url}/v1/completions", json=body, timeout=timeout_s)
        if r.status_code != 200:
            raise ServerError(r.status_code, r.text)
        return r.json()

    def log_tail(self, num_bytes: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-num_bytes:].decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL the server and its engine processes (one process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self.proc.wait()
        self._log.close()


def token_ids(response: dict[str, Any]) -> list[int]:
    """The generated token ids of a completion response (vLLM's `return_token_ids`)."""
    return list(response["choices"][0]["token_ids"])


def prefill_then_decode(producer: VllmServer, consumer: VllmServer, prompt: str, *,
                        max_tokens: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a two-step P/D proxy does: prefill with `do_remote_decode` and one token, then send
    the returned `kv_transfer_params` with the prompt to the consumer. Returns both responses."""
    first = producer.complete(prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    params = first.get("kv_transfer_params")
    if not params:
        raise AssertionError(f"producer returned no kv_transfer_params: {first}")
    second = consumer.complete(prompt, max_tokens=max_tokens, kv_transfer_params=params)
    return first, second
