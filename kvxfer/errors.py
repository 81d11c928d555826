"""The one error tree of kvxfer. Every failure a caller can act on is one of these.

Messages say where: the field, the value seen and the value expected, e.g.
"head range [8, 16) outside remote rank 1 heads [0, 8)".
"""

from __future__ import annotations

from typing import Protocol


class KvxferError(Exception):
    """Base of every error kvxfer raises on purpose."""

    kind = "error"


class ConfigError(KvxferError):
    """A setting is missing, malformed or contradicts another one."""

    kind = "config"


class LayoutError(KvxferError):
    """A cache description is malformed or does not match its tensor."""

    kind = "layout"


class PlanError(KvxferError):
    """No correct transfer plan exists for this pair of caches or this request."""

    kind = "plan"


class HandshakeError(KvxferError):
    """The side channel could not establish a peer."""

    kind = "handshake"


class AuthError(HandshakeError):
    """The peer is not allowed: wrong or unknown CURVE key, or a token that is not ours."""

    kind = "auth"


class IncompatiblePeerError(HandshakeError):
    """The peer's protocol, model or cache cannot be paired with ours.

    `mismatches` holds one (field, ours, theirs) triple per mismatching field so callers can
    report every difference at once instead of the first.
    """

    kind = "incompatible"

    def __init__(self, peer: str, mismatches: list[tuple[str, object, object]]):
        self.peer = peer
        self.mismatches = mismatches
        lines = [f"  {field}: local={ours!r} remote={theirs!r}" for field, ours, theirs in mismatches]
        super().__init__(f"peer {peer} is incompatible ({len(mismatches)} field(s)):\n" + "\n".join(lines))


class Landing(Protocol):
    """Transfers given up while NIXL still runs them (kvxfer.agents.nixl_agent.Landing)."""

    def settled(self) -> bool: ...


class TransferError(KvxferError):
    """A transfer failed after it was posted.

    `landing`: the request's transfers still running when it was given up (a deadline, or one
    of several failed), or None. Until it is `settled()` they may still write (or read) the local
    memory they name: the caller keeps that memory from other requests until then."""

    kind = "transfer"
    landing: Landing | None = None


class TransferTimeout(TransferError):
    """A transfer did not complete within its deadline."""

    kind = "timeout"


class PeerGoneError(TransferError):
    """The peer died, restarted (new boot epoch) or stopped answering."""

    kind = "peer_gone"


class LeaseError(KvxferError):
    """A request's blocks are not (or no longer) held: expired, aborted or never granted."""

    kind = "lease"


class AllocationError(KvxferError):
    """Not enough free blocks, or a block freed or released more often than it was taken."""

    kind = "allocation"


class LoadFailed(KvxferError):
    """A decode request's KV could not be loaded; `cause` is the kvxfer error kind behind it."""

    kind = "kv_load_failed"

    def __init__(self, message: str, cause: str, quarantine_s: float = 0.0, reads_may_land: bool = False):
        super().__init__(message)
        self.cause = cause
        self.quarantine_s = quarantine_s  # the blocks may still receive a push until then
        self.reads_may_land = reads_may_land  # a READ was posted: its blocks wait until no rank's still runs


def _raisable(cls: type[KvxferError]) -> type[KvxferError]:
    """`cls`, or its nearest parent that takes a message alone. A class with its own constructor
    (IncompatiblePeerError, LoadFailed) needs more than the message a reply carries; its parent
    still says the same thing to `except` clauses upstream."""
    while "__init__" in vars(cls):
        cls = cls.__mro__[1]
    return cls


def _by_kind() -> dict[str, type[KvxferError]]:
    found: dict[str, type[KvxferError]] = {}
    pending: list[type[KvxferError]] = [KvxferError]
    while pending:
        cls = pending.pop()
        found[cls.kind] = _raisable(cls)
        pending.extend(cls.__subclasses__())
    # Kinds of a side-channel ErrorReply that no class carries: the peer could not read our
    # message, or does not speak our protocol version; either way the pairing failed.
    found.update(malformed=HandshakeError, version=HandshakeError)
    return found


# The one map from a reported error kind to the class raised again here; every kind above is in it.
ERROR_CLASSES: dict[str, type[KvxferError]] = _by_kind()


def error_class(kind: str) -> type[KvxferError]:
    """The error class for `kind` (KvxferError for an unknown kind): how an error reported by
    another process (a rank's reply, a peer's ErrorReply) is raised again here."""
    return ERROR_CLASSES.get(kind, KvxferError)
