"""Shared pieces of the side-channel tests (no tests here): keys, configs, a recording handler."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kvxfer.agents import messages as m
from kvxfer.agents.keys import KeyConfig, KeyPair, generate_keypair
from kvxfer.agents.sidechannel import ClientConfig, PeerInfo, ServerConfig


@dataclass(frozen=True)
class Keys:
    server: KeyPair = field(default_factory=generate_keypair)
    client: KeyPair = field(default_factory=generate_keypair)
    stranger: KeyPair = field(default_factory=generate_keypair)

    def server_config(self, **kw: object) -> ServerConfig:
        keys = KeyConfig(own=self.server, allowed_client_keys=frozenset({self.client.public}))
        return ServerConfig(keys=keys, engine_id="prefill-0", boot_epoch=11, **kw)  # type: ignore[arg-type]

    def client_config(self, *, own: KeyPair | None = None, server_key: bytes | None = None) -> ClientConfig:
        keys = KeyConfig(own=own or self.client, server_public_key=server_key or self.server.public)
        return ClientConfig(keys=keys)


@dataclass
class Recorder:
    """A handler that records who called with what, and answers Ack (or what `answer` says)."""

    calls: list[tuple[PeerInfo, m.Message]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, peer: PeerInfo, msg: m.Message) -> m.Message:
        with self.lock:
            self.calls.append((peer, msg))
        return self.answer(peer, msg)

    def answer(self, peer: PeerInfo, msg: m.Message) -> m.Message:
        return m.Ack(request_id=getattr(msg, "request_id", ""))
