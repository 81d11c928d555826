"""The side channel: authenticated request/response between ranks over ZeroMQ.

Server: a ROUTER socket served by its own thread (`SideChannelServer`, a context manager). Client:
a DEALER socket (`SideChannelClient`): a call waited for (`request`), or sent now and its reply
taken later (`call`). Frames are `[call_id (8 bytes), body]`, where `body` is one
`messages.Message`; the reply carries the same call id, so a late reply to an abandoned call is
recognised and dropped.

Security (docs/security.md): with CURVE (the default) the server has a key pair and answers ZAP
(ZeroMQ's authentication protocol) itself, admitting only client public keys on its allow-list;
a refused client completes no handshake, so it can send nothing and receives nothing. The
authenticated key reaches the handler as `PeerInfo.public_key`. Plaintext needs an explicit
`insecure=True` and is logged as a warning. The default listen host is 127.0.0.1. Keys are never
logged; log lines name a key by `key_fingerprint` only.

Hostile input never stops the server: a frame it cannot parse is counted (`ServerStats`), logged
(rate limited), and answered with `ErrorReply` when it carried a well-formed call id.
"""

from kvxfer.agents.sidechannel.client import (
    ClientConfig,
    PendingCall,
    SideChannelClient,
    raise_for_reply,
)
from kvxfer.agents.sidechannel.clients import ClientCache, Target, producer_target, rank_address
from kvxfer.agents.sidechannel.common import (
    CALL_ID_BYTES,
    DEFAULT_HOST,
    PeerInfo,
    check_binding,
    key_fingerprint,
)
from kvxfer.agents.sidechannel.server import Handler, ServerConfig, ServerStats, SideChannelServer

__all__ = [
    "CALL_ID_BYTES",
    "DEFAULT_HOST",
    "ClientCache",
    "ClientConfig",
    "Handler",
    "PeerInfo",
    "PendingCall",
    "ServerConfig",
    "ServerStats",
    "SideChannelClient",
    "SideChannelServer",
    "Target",
    "check_binding",
    "key_fingerprint",
    "producer_target",
    "raise_for_reply",
    "rank_address",
]
