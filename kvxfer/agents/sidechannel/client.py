"""The side channel's client: a DEALER socket to one server, with a monitor for the ZMTP
handshake, deadlines on every call, and typed errors for every refusal."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.utils.monitor

from kvxfer.agents import messages as m
from kvxfer.agents.keys import KeyConfig
from kvxfer.agents.sidechannel.common import CALL_ID_BYTES, Ctx, Sock, check_security, log
from kvxfer.errors import (
    AuthError,
    ConfigError,
    HandshakeError,
    KvxferError,
    PeerGoneError,
    TransferTimeout,
    error_class,
)

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
        raise error_class(reply.kind)(f"peer {peer} answered {reply.kind}: {reply.message}")
    return reply


@dataclass(frozen=True)
class ClientConfig:
    keys: KeyConfig | None = None  # needs `own` and `server_public_key`
    insecure: bool = False
    max_message_bytes: int = 32 << 20
    reconnect_interval_s: float = 0.1
    handshake_timeout_s: float = 5.0  # ZMTP handshake, bounded separately from each request

    def __post_init__(self) -> None:
        check_security(self.keys, self.insecure, who="side channel client")


@dataclass
class _Link:
    """One DEALER socket, its monitor and what the monitor has reported so far."""

    sock: Sock
    monitor: Sock
    events: int = 0  # OR of every event seen
    connected: bool = False  # a ZMTP handshake succeeded and no disconnect since
    pollers: dict[int, zmq.Poller] = field(default_factory=dict)  # by the socket's flags: made once


class SideChannelClient:
    """Request/response to one server. Thread-safe: calls are serialised, and a call waiting
    behind another still ends by its own deadline.

    A failed call (timeout, peer gone, auth) drops the socket; the next call reconnects, so a
    restarted server is reached again and nothing queued for the old one is delivered late.
    """

    def __init__(self, address: str, config: ClientConfig, *, context: Ctx | None = None):
        if config.keys is not None and config.keys.server_public_key is None:
            raise ConfigError(f"side channel client for {address}: no server key (none configured, and the "
                              f"request named none)")
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
        with self.call(msg, timeout_s=timeout_s) as pending:
            return pending.wait()

    def call(self, msg: m.Message, *, timeout_s: float) -> PendingCall:
        """Send `msg` and return at once: the reply is taken by `PendingCall.poll` (without
        waiting) or `wait`, with `request`'s errors and deadline. The client is the call's until
        its reply (or error) is taken or it is closed: later calls wait for it, each within its
        own deadline; a reply nobody took is dropped by the next call (its call id differs)."""
        deadline = time.monotonic() + timeout_s
        what = type(msg).__name__
        if not self._lock.acquire(timeout=max(0.0, timeout_s)):
            raise TransferTimeout(f"side channel {self.address}: {what} waited {timeout_s}s behind another call")
        call_id = os.urandom(CALL_ID_BYTES)
        try:
            link = self._ensure_link()
            self._send(link, [call_id, m.encode(msg)], deadline, what=what)
        except BaseException as err:
            if isinstance(err, KvxferError):
                self._drop_link()
            self._lock.release()
            raise
        return PendingCall(self, link, call_id, deadline, what)

    def _reply(self, link: _Link, call_id: bytes, deadline: float, *, what: str, block: bool) -> m.Message | None:
        """The call's reply (None: not yet, `block` false); a failure drops the link."""
        try:
            reply = self._receive(link, call_id, deadline, what=what, block=block)
        except KvxferError:
            self._drop_link()
            raise
        return None if reply is None else raise_for_reply(reply, peer=self.address)

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
        poller = link.pollers.get(flags)
        if poller is None:
            poller = link.pollers[flags] = zmq.Poller()
            poller.register(link.sock, flags)
            poller.register(link.monitor, zmq.POLLIN)
        remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
        ready = dict(poller.poll(remaining_ms))
        if link.monitor in ready:
            self._read_monitor(link)
        return bool(ready.get(link.sock, 0) & flags)

    def _send(self, link: _Link, frames: list[bytes], deadline: float, *, what: str) -> None:
        if link.connected:  # the usual case: the send queues at once (IMMEDIATE refuses it otherwise)
            try:
                link.sock.send_multipart(frames, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
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

    def _receive(self, link: _Link, call_id: bytes, deadline: float, *, what: str,
                 block: bool = True) -> m.Message | None:
        while True:
            if self._poll(link, zmq.POLLIN, deadline if block else 0.0):
                reply = self._read_reply(link, call_id)
                if reply is not None:
                    return reply
                continue  # a late reply to an earlier call: the next frame may be ours
            if link.events & zmq.EVENT_DISCONNECTED and not link.connected:
                raise PeerGoneError(f"side channel {self.address}: connection lost while waiting for the reply to {what}")
            if time.monotonic() >= deadline:
                raise TransferTimeout(f"side channel {self.address}: no reply to {what} before the deadline")
            if not block:
                return None

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


class PendingCall:
    """A call sent by `SideChannelClient.call`. Holds its client until its reply (or error) is
    taken or `close` (a context manager), whichever comes first."""

    def __init__(self, client: SideChannelClient, link: _Link, call_id: bytes, deadline: float, what: str) -> None:
        self._client = client
        self._link = link
        self._call_id = call_id
        self._deadline = deadline
        self._what = what
        self._closed = False
        self.reply: m.Message | None = None

    def poll(self) -> m.Message | None:
        """The reply if it has come (raising the typed error of an `ErrorReply`), else None;
        past the deadline, or once the connection dropped, raises as `request` would."""
        if self.reply is None:
            self.reply = self._take(block=False)
        return self.reply

    def wait(self) -> m.Message:
        """The reply, waiting for it up to the deadline."""
        reply = self.reply if self.reply is not None else self._take(block=True)
        if reply is None:  # a blocking take returns the reply or raises; never None
            raise TransferTimeout(f"side channel {self._client.address}: no reply to {self._what}")
        self.reply = reply
        return reply

    def _take(self, *, block: bool) -> m.Message | None:
        if self._closed:
            raise ConfigError(f"side channel {self._client.address}: {self._what}'s reply taken after close")
        try:
            reply = self._client._reply(self._link, self._call_id, self._deadline, what=self._what, block=block)
        except BaseException:
            self.close()
            raise
        if reply is not None:
            self.close()  # the call is over: the client serves the next one now
        return reply

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client._lock.release()

    def __enter__(self) -> PendingCall:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
