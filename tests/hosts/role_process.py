"""One protocol role (kvxfer.agents.producer or .consumer) in its own process on one host of the
topology, driven by a test over stdin/stdout, one JSON object per line each way. The daemons are
left out on purpose: the test sees what the consumer role itself reports about a failed load.

    python role_process.py producer ADDRESS PORT   # {"hold": [blocks], "num_tokens": n} -> params
    python role_process.py consumer                # {"params": ..., "local": [blocks]} -> outcome

Both caches hold a pattern the consumer can recognise: the producer's block b is filled with b + 1
in every layer, the consumer's start at -1. The consumer reports, besides each load's outcome, every
request `take_settled` names, with whether its blocks still hold what they held at the failure.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import msgspec
import numpy as np
import torch

from kvxfer.agents import messages as m
from kvxfer.agents.capability import Signer, identity_of_peer, master_secret
from kvxfer.agents.consumer import Consumer, Load
from kvxfer.agents.endpoint import DeadlinePolicy, Endpoint, Identity
from kvxfer.agents.heartbeat import LeaseClient
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.agents.nixl_agent import AgentConfig
from kvxfer.agents.producer import Held, Producer
from kvxfer.agents.sidechannel import ClientCache, ClientConfig, ServerConfig
from kvxfer.errors import KvxferError
from kvxfer.layouts import describe

BLOCK = 16
NUM_BLOCKS = 16
DEADLINE_S = 2.0  # a READ posted while the link is down gives up after this
LEASE_S = 120.0  # the producer keeps the blocks (and their data) for the whole test


def endpoint(role: m.Role, name: str) -> Endpoint:
    desc = describe("flashinfer-hnd", num_layers=2, num_blocks=NUM_BLOCKS, block_size=BLOCK, num_heads=2,
                    head_dim=64, dtype="float32")
    tensors = [torch.full(desc.shape, -1.0) for _ in range(desc.num_layers)]
    if role is m.Role.PREFILL:
        for t in tensors:
            t.copy_(torch.arange(1, NUM_BLOCKS + 1, dtype=t.dtype).view(-1, 1, 1, 1, 1).expand(desc.shape))
    identity = Identity(engine_id=name, boot_epoch=1, role=role, tp_size=1, tp_rank=0, model_fingerprint="fp")
    return Endpoint(identity, tensors, desc, agent_config=AgentConfig(name=f"{name}-agent"),
                    deadline=DeadlinePolicy(slack_s=DEADLINE_S))


def say(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def producer(address: str, port: int) -> None:
    prefill = endpoint(m.Role.PREFILL, "prefill0")
    role = Producer(prefill, signer=Signer(master_secret(None, engine_id="prefill0", boot_epoch=1)), lease_s=LEASE_S,
                    metrics=TransferMetrics(), on_release=lambda held, outcome: None, nixl_lock=threading.RLock())
    role.start(ServerConfig(host=address, port=port, insecure=True, engine_id="prefill0", boot_epoch=1))
    say({"ready": True})
    for line in sys.stdin:
        ask = json.loads(line)
        transfer_id, binding = m.new_request_id(), m.Binding(consumer_engine_id="decode0")
        expires = role.hold(Held(transfer_id, tuple(ask["hold"]), ask["num_tokens"], binding))
        params = role.sign(m.TransferParams(
            engine_id="prefill0", boot_epoch=1, request_id=transfer_id, block_ids=ask["hold"],
            side_channel=f"tcp://{address}:{port}", tp_size=1, binding=binding, num_tokens=ask["num_tokens"],
            lease_s=LEASE_S, expires_unix_ms=expires))
        say({"params": msgspec.to_builtins(params)})


class ConsumerProcess:
    def __init__(self) -> None:
        self.decode = endpoint(m.Role.DECODE, "decode0")
        clients = ClientCache(ClientConfig(insecure=True))
        self.role = Consumer(self.decode, clients=clients, leases=LeaseClient(clients, timeout_s=5.0),
                             nixl_lock=threading.RLock(), identity=identity_of_peer(None, "decode0"),
                             handshake_timeout_s=5.0, request_timeout_s=5.0)
        self.at_failure: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
        self.lock = threading.Lock()  # a failure's snapshot is taken before its settlement is looked at
        threading.Thread(target=self._idle, daemon=True).start()

    def load(self, params: m.TransferParams, local: list[int]) -> dict:
        started = time.monotonic()
        with self.lock:
            try:
                loaded = self.role.load(Load(params, np.asarray(local), params.num_tokens))
            except KvxferError as err:
                self.at_failure[params.request_id] = (local, [t[local].clone() for t in self.decode.tensors])
                return {"failed": err.kind, "seconds": time.monotonic() - started,
                        "landing": self.role.landing(params.request_id)}
        return {"loaded": loaded.summary.num_bytes, "holds": self.holds(local)}

    def holds(self, local: list[int]) -> list[float]:
        """What each block holds (the producer block it came from, or -1), read off layer 0's first value."""
        return [float(self.decode.tensors[0][b].reshape(-1)[0]) for b in local]

    def _idle(self) -> None:
        while True:
            self.role.idle()
            with self.lock:
                settled = self.role.take_settled()
            for rid in settled:
                local, then = self.at_failure.pop(rid)
                unchanged = all(torch.equal(t[local], old) for t, old in zip(self.decode.tensors, then, strict=True))
                say({"settled": rid, "unchanged_since_failure": unchanged, "holds": self.holds(local)})
            time.sleep(0.005)


def consumer() -> None:
    process = ConsumerProcess()
    say({"ready": True})
    for line in sys.stdin:
        ask = json.loads(line)
        say(process.load(msgspec.convert(ask["params"], m.TransferParams), ask["local"]))


if __name__ == "__main__":
    if sys.argv[1] == "producer":
        producer(sys.argv[2], int(sys.argv[3]))
    else:
        consumer()
