"""The one error tree of kvxfer. Every failure a caller can act on is one of these.

Messages say where: the field, the value seen and the value expected, e.g.
"head range [8, 16) outside remote rank 1 heads [0, 8)".
"""

from __future__ import annotations


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


class TransferError(KvxferError):
    """A transfer failed after it was posted."""

    kind = "transfer"


class TransferTimeout(TransferError):
    """A transfer did not complete within its deadline."""

    kind = "timeout"


class PeerGoneError(TransferError):
    """The peer died, restarted (new boot epoch) or stopped answering."""

    kind = "peer_gone"


class LeaseError(KvxferError):
    """A request's blocks are not (or no longer) held: expired, aborted or never granted."""

    kind = "lease"


def error_class(kind: str) -> type[KvxferError]:
    """The error class whose `kind` is `kind` (KvxferError for an unknown kind): how an error
    reported by another process (a rank's reply, a peer's ErrorReply) is raised again here."""
    pending: list[type[KvxferError]] = [KvxferError]
    while pending:
        cls = pending.pop()
        if cls.kind == kind:
            # A class with its own constructor (IncompatiblePeerError) takes more than a message:
            # raise its parent, which still says the same thing to `except` clauses upstream.
            while "__init__" in vars(cls):
                cls = cls.__mro__[1]
            return cls
        pending.extend(cls.__subclasses__())
    return KvxferError
