"""The side channel: authenticated request/response between ranks over ZeroMQ.

Server: a ROUTER socket served by its own thread (`SideChannelServer`, a context manager). Client:
a DEALER socket (`SideChannelClient`). Frames are `[call_id (8 bytes), body]`, where `body` is one
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

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

import msgspec
import zmq
import zmq.utils.monitor
from zmq.utils import z85

from kvxfer.agents import messages as m
from kvxfer.agents.keys import KeyConfig
from kvxfer.errors import (
    AuthError,
    ConfigError,
    HandshakeError,
    KvxferError,
    LayoutError,
    LeaseError,
    PeerGoneError,
    PlanError,
    TransferError,
    TransferTimeout,
)

log = logging.getLogger(__name__)
_Sock: TypeAlias = "zmq.Socket[bytes]"
_Ctx: TypeAlias = "zmq.Context[zmq.Socket[bytes]]"

DEFAULT_HOST = "127.0.0.1"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"kvxfer"
CALL_ID_BYTES = 8
_WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]")


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


Handler = Callable[[PeerInfo, m.Message], m.Message]


def _check_security(keys: KeyConfig | None, insecure: bool, *, who: str) -> None:
    if insecure and keys is not None:
        raise ConfigError(f"{who}: insecure=True and CURVE keys both given; choose one")
    if not insecure and keys is None:
        raise ConfigError(f"{who}: CURVE keys are required (or insecure=True for local experiments)")


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = 0  # 0: an ephemeral port, see `SideChannelServer.address`
    keys: KeyConfig | None = None
    insecure: bool = False
    engine_id: str = ""  # answered in Pong
    boot_epoch: int = 0  # answered in Pong
    max_message_bytes: int = 32 << 20
    poll_interval_s: float = 0.05  # how soon stop() is noticed
    start_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _check_security(self.keys, self.insecure, who="side channel server")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"side channel server: port={self.port} outside [0, 65535]")
        if self.max_message_bytes <= 0:
            raise ConfigError(f"side channel server: max_message_bytes={self.max_message_bytes} must be positive")


@dataclass
class ServerStats:
    received: int = 0
    replied: int = 0
    malformed: int = 0  # frames or bodies that could not be parsed, or the wrong version
    handler_errors: int = 0  # unexpected exceptions in the handler (KvxferError excluded)
    auth_allowed: int = 0
    auth_refused: int = 0
    send_failures: int = 0
    internal_errors: int = 0  # bugs caught by the serve loop's last line of defence (must stay 0)


class _RateLimitedLog:
    """One warning line per `interval_s` at most; says how many were suppressed."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self._next = 0.0
        self._suppressed = 0

    def warning(self, fmt: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} similar suppressed)" if self._suppressed else ""
        log.warning(fmt + suffix, *args)
        self._next, self._suppressed = now + self.interval_s, 0


class SideChannelServer:
    """Serves `handler(peer, msg) -> reply` on its own thread. Use as a context manager.

    The handler runs on the server thread, one message at a time: keep it short. A `KvxferError`
    it raises becomes `ErrorReply(kind=err.kind)`; any other exception becomes
    `ErrorReply(kind="internal")` and is counted. `Ping` is answered by the server itself.
    """

    def __init__(self, config: ServerConfig, handler: Handler):
        self.config = config
        self._handler = handler
        self._stats = ServerStats()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._bind_error: BaseException | None = None
        self._port = 0
        self._bad_input_log = _RateLimitedLog()

    @property
    def address(self) -> str:
        if not self._port:
            raise ConfigError("side channel server: address asked before start()")
        host = self.config.host
        return f"tcp://[{host}]:{self._port}" if ":" in host else f"tcp://{host}:{self._port}"

    def stats(self) -> ServerStats:
        with self._stats_lock:
            return ServerStats(**vars(self._stats))

    def start(self) -> None:
        if self._thread is not None:
            raise ConfigError("side channel server: already started")
        self._thread = threading.Thread(target=self._run, name="kvxfer-sidechannel", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.config.start_timeout_s):
            self.stop()
            raise ConfigError(f"side channel server: not listening within {self.config.start_timeout_s}s")
        if self._bind_error is not None:
            self._thread.join(self.config.start_timeout_s)
            raise ConfigError(
                f"side channel server: cannot listen on {self.config.host}:{self.config.port}: "
                f"{self._bind_error}"
            )

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("side channel server thread did not stop within %.1fs", timeout_s)

    def __enter__(self) -> SideChannelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- server thread --------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self._stats, name, getattr(self._stats, name) + n)

    def _run(self) -> None:
        ctx = zmq.Context()
        sockets: list[_Sock] = []
        try:
            zap, sock = self._open(ctx, sockets)
        except (zmq.ZMQError, KvxferError) as err:
            self._bind_error = err
            self._ready.set()
            _close(sockets, ctx)
            return
        self._ready.set()
        try:
            self._serve(zap, sock)
        finally:
            _close(sockets, ctx)

    def _open(self, ctx: _Ctx, sockets: list[_Sock]) -> tuple[_Sock | None, _Sock]:
        cfg = self.config
        zap = None
        if not cfg.insecure:
            # Bound before the ROUTER exists: libzmq admits every CURVE key when no ZAP handler is.
            zap = ctx.socket(zmq.REP)
            sockets.append(zap)
            zap.linger = 0
            zap.bind(ZAP_ENDPOINT)
        sock = ctx.socket(zmq.ROUTER)
        sockets.append(sock)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # replies to a vanished peer fail, not block
        self._secure(sock)
        self._bind(sock)
        return zap, sock

    def _secure(self, sock: _Sock) -> None:
        keys = self.config.keys
        if keys is None:
            log.warning("side channel server: INSECURE plaintext mode, no authentication, no encryption")
            return
        sock.curve_server = True
        sock.curve_secretkey = keys.own.secret
        sock.curve_publickey = keys.own.public
        sock.zap_domain = ZAP_DOMAIN
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def _bind(self, sock: _Sock) -> None:
        cfg = self.config
        if cfg.host in _WILDCARD_HOSTS:
            log.warning("side channel server: listening on every interface (%s) as configured", cfg.host)
        host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
        if cfg.port:
            sock.bind(f"tcp://{host}:{cfg.port}")
            self._port = cfg.port
        else:
            self._port = sock.bind_to_random_port(f"tcp://{host}")
        log.info("side channel server listening on %s (%s)", self.address, "insecure" if cfg.insecure else "CURVE")

    def _serve(self, zap: _Sock | None, sock: _Sock) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
        interval_ms = max(1, int(self.config.poll_interval_s * 1000))
        while not self._stop.is_set():
            ready = dict(poller.poll(interval_ms))
            if zap is not None and zap in ready:
                self._answer_zap(zap)
            if sock in ready:
                self._drain(sock)

    def _answer_zap(self, zap: _Sock) -> None:
        """One ZAP request (RFC 27): admit CURVE clients whose key is on the allow-list."""
        frames = zap.recv_multipart()
        allowed, user_id, address = self._zap_verdict(frames)
        request_id = frames[1] if len(frames) > 1 else b""
        status = (b"200", b"OK") if allowed else (b"400", b"not allowed")
        zap.send_multipart([b"1.0", request_id, *status, user_id, b""])
        if allowed:
            self._count("auth_allowed")
        else:
            self._count("auth_refused")
            self._bad_input_log.warning("side channel: refused a client from %s (CURVE key not allowed)", address)

    def _zap_verdict(self, frames: list[bytes]) -> tuple[bool, bytes, str]:
        if len(frames) != 7 or frames[0] != b"1.0" or frames[5] != b"CURVE":
            return False, b"", "?"
        _, _, domain, address, _, _, client_key = frames
        if domain != ZAP_DOMAIN or len(client_key) != 32 or self.config.keys is None:
            return False, b"", address.decode("ascii", "replace")
        key = z85.encode(client_key)
        allowed = key in self.config.keys.allowed_client_keys
        return allowed, (key if allowed else b""), address.decode("ascii", "replace")

    def _drain(self, sock: _Sock, max_batch: int = 256) -> None:
        for _ in range(max_batch):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._count("received")
            try:
                self._handle_frames(sock, frames)
            except Exception as err:  # last line of defence: one bad message never stops serving
                self._count("internal_errors")
                log.error("side channel: unexpected %s handling a message: %.200s", type(err).__name__, err)

    def _handle_frames(self, sock: _Sock, frames: list[zmq.Frame]) -> None:
        if len(frames) != 3 or len(frames[1].bytes) != CALL_ID_BYTES:
            self._count("malformed")
            self._bad_input_log.warning("side channel: dropped a message of %d frame(s) without a valid call id", len(frames))
            return
        routing_id, call_id, body = frames[0].bytes, frames[1].bytes, frames[2]
        reply = self._safe_reply_to(_peer_of(routing_id, body), body.bytes)
        try:
            sock.send_multipart([routing_id, call_id, m.encode(reply)], flags=zmq.NOBLOCK)
            self._count("replied")
        except zmq.ZMQError as err:
            self._count("send_failures")
            self._bad_input_log.warning("side channel: reply not sent (%s)", err)

    def _safe_reply_to(self, peer: PeerInfo, body: bytes) -> m.Message:
        try:
            return self._reply_to(peer, body)
        except Exception as err:  # a bug of ours: answer, count, keep serving
            self._count("internal_errors")
            log.error("side channel: unexpected %s handling a message: %.200s", type(err).__name__, err)
            return m.ErrorReply(kind="internal", message="internal error")

    def _reply_to(self, peer: PeerInfo, body: bytes) -> m.Message:
        try:
            msg = m.decode(body)
        except msgspec.DecodeError as err:
            return self._refuse(peer, "malformed", f"undecodable message: {err}", body)
        if msg.protocol_version != m.PROTOCOL_VERSION:
            return self._refuse(peer, "version", _version_text(msg.protocol_version), body)
        if isinstance(msg, m.Ping):
            return m.Pong(nonce=msg.nonce, engine_id=self.config.engine_id, boot_epoch=self.config.boot_epoch)
        return self._call_handler(peer, msg)

    def _refuse(self, peer: PeerInfo, kind: str, text: str, body: bytes) -> m.ErrorReply:
        if kind == "malformed":
            version = m.probe_version(body)
            if version is not None and version != m.PROTOCOL_VERSION:
                kind, text = "version", _version_text(version)
        self._count("malformed")
        self._bad_input_log.warning("side channel: %s message from %s (%d bytes): %.200s", kind, peer.address, len(body), text)
        return m.ErrorReply(kind=kind, message=text[:1000])

    def _call_handler(self, peer: PeerInfo, msg: m.Message) -> m.Message:
        try:
            reply = self._handler(peer, msg)
        except KvxferError as err:
            return m.ErrorReply(kind=err.kind, message=str(err)[:4000])
        except Exception as err:  # a handler bug must not stop the listener
            self._count("handler_errors")
            log.error("side channel: handler failed on %s: %s: %.200s", type(msg).__name__, type(err).__name__, err)
            return m.ErrorReply(kind="internal", message=f"internal error handling {type(msg).__name__}")
        if not isinstance(reply, m.MESSAGE_TYPES):
            self._count("handler_errors")
            log.error("side channel: handler returned %s, not a message", type(reply).__name__)
            return m.ErrorReply(kind="internal", message=f"internal error handling {type(msg).__name__}")
        return reply


def _version_text(version: int) -> str:
    return f"protocol_version={version} is not supported (this side speaks {m.PROTOCOL_VERSION})"


def _peer_of(routing_id: bytes, frame: zmq.Frame) -> PeerInfo:
    def prop(name: str) -> str:
        try:
            return str(frame.get(name))
        except (zmq.ZMQError, UnicodeDecodeError):
            return ""

    user_id = prop("User-Id")
    return PeerInfo(routing_id=routing_id, public_key=user_id or None, address=prop("Peer-Address"))


def _close(sockets: list[_Sock], ctx: _Ctx) -> None:
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()


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


# -- client -------------------------------------------------------------------------------------

_ERROR_KINDS: dict[str, type[KvxferError]] = {
    cls.kind: cls
    for cls in (AuthError, ConfigError, HandshakeError, LayoutError, LeaseError, PlanError,
                TransferError, TransferTimeout, PeerGoneError)
}
_ERROR_KINDS.update({"incompatible": HandshakeError, "malformed": HandshakeError, "version": HandshakeError})

_MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def raise_for_reply(reply: m.Message, *, peer: str) -> m.Message:
    """The reply itself, or the typed error an `ErrorReply` stands for."""
    if isinstance(reply, m.ErrorReply):
        cls = _ERROR_KINDS.get(reply.kind, KvxferError)
        raise cls(f"peer {peer} answered {reply.kind}: {reply.message}")
    return reply


@dataclass(frozen=True)
class ClientConfig:
    keys: KeyConfig | None = None  # needs `own` and `server_public_key`
    insecure: bool = False
    max_message_bytes: int = 32 << 20
    reconnect_interval_s: float = 0.1
    handshake_timeout_s: float = 5.0  # ZMTP handshake, bounded separately from each request

    def __post_init__(self) -> None:
        _check_security(self.keys, self.insecure, who="side channel client")
        if self.keys is not None and self.keys.server_public_key is None:
            raise ConfigError("side channel client: keys.server_public_key is required with CURVE")


@dataclass
class _Link:
    """One DEALER socket, its monitor and what the monitor has reported so far."""

    sock: _Sock
    monitor: _Sock
    events: int = 0  # OR of every event seen
    connected: bool = False  # a ZMTP handshake succeeded and no disconnect since


class SideChannelClient:
    """Request/response to one server. Thread-safe: calls are serialised, and a call waiting
    behind another still ends by its own deadline.

    A failed call (timeout, peer gone, auth) drops the socket; the next call reconnects, so a
    restarted server is reached again and nothing queued for the old one is delivered late.
    """

    def __init__(self, address: str, config: ClientConfig, *, context: _Ctx | None = None):
        self.address = address
        self.config = config
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._link: _Link | None = None
        if config.insecure:
            log.warning("side channel client: INSECURE plaintext connection to %s", address)

    def request(self, msg: m.Message, *, timeout_s: float) -> m.Message:
        """Send `msg`, return the reply. Raises within `timeout_s`: TransferTimeout (no reply),
        PeerGoneError (no connection, or it dropped), AuthError (CURVE handshake refused), or
        the typed error an `ErrorReply` stands for (`raise_for_reply`)."""
        deadline = time.monotonic() + timeout_s
        what = type(msg).__name__
        if not self._lock.acquire(timeout=max(0.0, timeout_s)):
            raise TransferTimeout(f"side channel {self.address}: {what} waited {timeout_s}s behind another call")
        try:
            reply = self._call(m.encode(msg), deadline, what=what)
        finally:
            self._lock.release()
        return raise_for_reply(reply, peer=self.address)

    def _call(self, body: bytes, deadline: float, *, what: str) -> m.Message:
        call_id = os.urandom(CALL_ID_BYTES)
        try:
            link = self._ensure_link()
            self._send(link, [call_id, body], deadline, what=what)
            return self._receive(link, call_id, deadline, what=what)
        except KvxferError:
            self._drop_link()
            raise

    def close(self) -> None:
        with self._lock:
            self._drop_link()

    def __enter__(self) -> SideChannelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_link(self) -> _Link:
        if self._link is None:
            self._link = self._open_link()
        return self._link

    def _open_link(self) -> _Link:
        cfg = self.config
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer that has not handshaken
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        sock.setsockopt(zmq.RECONNECT_IVL, max(1, int(cfg.reconnect_interval_s * 1000)))
        sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(cfg.handshake_timeout_s * 1000)))
        if cfg.keys is not None:
            sock.curve_secretkey = cfg.keys.own.secret
            sock.curve_publickey = cfg.keys.own.public
            sock.curve_serverkey = cfg.keys.server_public_key
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        try:
            sock.connect(self.address)
        except zmq.ZMQError as err:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            raise ConfigError(f"side channel client: cannot connect to {self.address!r}: {err}") from None
        return _Link(sock=sock, monitor=monitor)

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        try:
            link.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        link.monitor.close(linger=0)
        link.sock.close(linger=0)

    def _read_monitor(self, link: _Link) -> None:
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(link.monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = int(event["event"])
            link.events |= kind
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.connected = True
            elif kind == zmq.EVENT_DISCONNECTED:
                link.connected = False

    def _poll(self, link: _Link, flags: int, deadline: float) -> bool:
        """Wait until the socket has `flags` ready or the deadline passes; reads the monitor."""
        poller = zmq.Poller()
        poller.register(link.sock, flags)
        poller.register(link.monitor, zmq.POLLIN)
        remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
        ready = dict(poller.poll(remaining_ms))
        if link.monitor in ready:
            self._read_monitor(link)
        return bool(ready.get(link.sock, 0) & flags)

    def _send(self, link: _Link, frames: list[bytes], deadline: float, *, what: str) -> None:
        while True:
            self._raise_if_refused(link)
            if self._poll(link, zmq.POLLOUT, deadline):
                try:
                    link.sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    return
                except zmq.Again:
                    pass
            if time.monotonic() >= deadline:
                self._raise_if_refused(link)
                raise PeerGoneError(
                    f"side channel {self.address}: no connection for {what} before the deadline "
                    f"(nothing listening, unreachable, or handshake not finished)"
                )

    def _receive(self, link: _Link, call_id: bytes, deadline: float, *, what: str) -> m.Message:
        while True:
            if self._poll(link, zmq.POLLIN, deadline):
                reply = self._read_reply(link, call_id)
                if reply is not None:
                    return reply
            if link.events & zmq.EVENT_DISCONNECTED and not link.connected:
                raise PeerGoneError(f"side channel {self.address}: connection lost while waiting for the reply to {what}")
            if time.monotonic() >= deadline:
                raise TransferTimeout(f"side channel {self.address}: no reply to {what} before the deadline")

    def _read_reply(self, link: _Link, call_id: bytes) -> m.Message | None:
        try:
            frames = link.sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return None
        if len(frames) != 2 or frames[0] != call_id:
            return None  # a late reply to an abandoned call, or junk
        try:
            return m.decode(frames[1])
        except msgspec.DecodeError as err:
            raise HandshakeError(f"side channel {self.address}: malformed reply: {err}") from None

    def _raise_if_refused(self, link: _Link) -> None:
        if link.events & _HANDSHAKE_FAILED and not link.connected:
            raise AuthError(
                f"side channel {self.address}: handshake refused (our CURVE key is not allowed, the "
                f"server key is wrong, or one side is insecure and the other is not)"
            )
