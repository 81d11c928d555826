"""The side channel's server: a ROUTER socket served by its own thread, answering ZAP itself."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq
import zmq.utils.monitor
from zmq.utils import z85

from kvxfer.agents import messages as m
from kvxfer.agents.keys import KeyConfig
from kvxfer.agents.limited_log import LimitedLog
from kvxfer.agents.sidechannel.common import (
    CALL_ID_BYTES,
    DEFAULT_HOST,
    WILDCARD_HOSTS,
    ZAP_DOMAIN,
    ZAP_ENDPOINT,
    Ctx,
    PeerInfo,
    Sock,
    check_security,
    log,
    version_text,
)
from kvxfer.errors import ConfigError, KvxferError

Handler = Callable[[PeerInfo, m.Message], m.Message]


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
        check_security(self.keys, self.insecure, who="side channel server")
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
        self._bad_input_log = LimitedLog(log)

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
        sockets: list[Sock] = []
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

    def _open(self, ctx: Ctx, sockets: list[Sock]) -> tuple[Sock | None, Sock]:
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

    def _secure(self, sock: Sock) -> None:
        keys = self.config.keys
        if keys is None:
            log.warning("side channel server: INSECURE plaintext mode, no authentication, no encryption")
            return
        sock.curve_server = True
        sock.curve_secretkey = keys.own.secret
        sock.curve_publickey = keys.own.public
        sock.zap_domain = ZAP_DOMAIN
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def _bind(self, sock: Sock) -> None:
        cfg = self.config
        if cfg.host in WILDCARD_HOSTS:
            log.warning("side channel server: listening on every interface (%s) as configured", cfg.host)
        host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
        if cfg.port:
            sock.bind(f"tcp://{host}:{cfg.port}")
            self._port = cfg.port
        else:
            self._port = sock.bind_to_random_port(f"tcp://{host}")
        log.info("side channel server listening on %s (%s)", self.address, "insecure" if cfg.insecure else "CURVE")

    def _serve(self, zap: Sock | None, sock: Sock) -> None:
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

    def _answer_zap(self, zap: Sock) -> None:
        """One ZAP request (RFC 27): admit CURVE clients whose key is on the allow-list (any key
        with `admit_any_client`)."""
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
        allowed = self.config.keys.admit_any_client or key in self.config.keys.allowed_client_keys
        return allowed, (key if allowed else b""), address.decode("ascii", "replace")

    def _drain(self, sock: Sock, max_batch: int = 256) -> None:
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

    def _handle_frames(self, sock: Sock, frames: list[zmq.Frame]) -> None:
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
            return self._refuse(peer, "version", version_text(msg.protocol_version), body)
        if isinstance(msg, m.Ping):
            return m.Pong(nonce=msg.nonce, engine_id=self.config.engine_id, boot_epoch=self.config.boot_epoch)
        return self._call_handler(peer, msg)

    def _refuse(self, peer: PeerInfo, kind: str, text: str, body: bytes) -> m.ErrorReply:
        if kind == "malformed":
            version = m.probe_version(body)
            if version is not None and version != m.PROTOCOL_VERSION:
                kind, text = "version", version_text(version)
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


def _peer_of(routing_id: bytes, frame: zmq.Frame) -> PeerInfo:
    def prop(name: str) -> str:
        try:
            return str(frame.get(name))
        except (zmq.ZMQError, UnicodeDecodeError):
            return ""

    user_id = prop("User-Id")
    return PeerInfo(routing_id=routing_id, public_key=user_id or None, address=prop("Peer-Address"))


def _close(sockets: list[Sock], ctx: Ctx) -> None:
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()


