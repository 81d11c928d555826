"""What the side channel's server and client share: its constants, who a peer is, the security
settings both check, protocol-version text, and the check that a request's binding names the
peer that sent it."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TypeAlias

import zmq

from kvxfer.agents import messages as m
from kvxfer.agents.keys import KeyConfig
from kvxfer.errors import AuthError, ConfigError

log = logging.getLogger("kvxfer.agents.sidechannel")
Sock: TypeAlias = "zmq.Socket[bytes]"
Ctx: TypeAlias = "zmq.Context[zmq.Socket[bytes]]"

DEFAULT_HOST = "127.0.0.1"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"kvxfer"
CALL_ID_BYTES = 8
WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]")


def key_fingerprint(public_key: bytes | str) -> str:
    """A short, non-reversible name for a public key, for log lines."""
    raw = public_key.encode() if isinstance(public_key, str) else public_key
    return "key:" + hashlib.sha256(raw).hexdigest()[:12]


@dataclass(frozen=True)
class PeerInfo:
    """Who sent a message, as the transport (not the message) says."""

    routing_id: bytes = field(repr=False)
    public_key: str | None  # Z85 CURVE key the ZAP check admitted; None on an insecure server
    address: str  # the peer's IP address as ZeroMQ saw it ("" when unknown)


def check_security(keys: KeyConfig | None, insecure: bool, *, who: str) -> None:
    if insecure and keys is not None:
        raise ConfigError(f"{who}: insecure=True and CURVE keys both given; choose one")
    if not insecure and keys is None:
        raise ConfigError(f"{who}: CURVE keys are required (or insecure=True for local experiments)")


def version_text(version: int) -> str:
    return f"protocol_version={version} is not supported (this side speaks {m.PROTOCOL_VERSION})"


def check_binding(peer: PeerInfo, binding: m.Binding, *, engine_id: str | None = None) -> None:
    """Raise AuthError unless `peer` is the consumer that `binding` names.

    With CURVE the authenticated key must equal `binding.consumer_key`; a binding without a key is
    refused. On an insecure server (no key) only the engine id the peer handshook with can be
    compared, which stops mistakes, not attackers (docs/security.md).
    """
    if peer.public_key is not None:
        if not binding.consumer_key:
            raise AuthError(f"request is bound to no consumer key; refusing peer {key_fingerprint(peer.public_key)}")
        if peer.public_key != binding.consumer_key:
            raise AuthError(
                f"request is bound to consumer {key_fingerprint(binding.consumer_key)}, "
                f"not to peer {key_fingerprint(peer.public_key)}"
            )
        return
    if binding.consumer_engine_id and engine_id != binding.consumer_engine_id:
        raise AuthError(f"request is bound to engine {binding.consumer_engine_id!r}, not to {engine_id!r}")


