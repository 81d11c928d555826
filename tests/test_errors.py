"""kvxfer.errors: an error kind reported by another process (a rank's reply on the bus, a peer's
ErrorReply on the side channel) is raised again here as the class that reported it."""

import pytest

from kvxfer.agents import messages as m
from kvxfer.agents.sidechannel.client import raise_for_reply
from kvxfer.errors import (
    AllocationError,
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
    error_class,
)

# Every kind a process may report, and what `except` clauses here see.
KINDS = [
    ("error", KvxferError),
    ("config", ConfigError),
    ("layout", LayoutError),
    ("plan", PlanError),
    ("handshake", HandshakeError),
    ("auth", AuthError),
    ("incompatible", HandshakeError),  # IncompatiblePeerError takes a field list, not a message
    ("malformed", HandshakeError),  # side-channel reply kinds without a class of their own
    ("version", HandshakeError),
    ("transfer", TransferError),
    ("timeout", TransferTimeout),
    ("peer_gone", PeerGoneError),
    ("lease", LeaseError),
    ("allocation", AllocationError),
    ("kv_load_failed", KvxferError),  # LoadFailed takes its cause too
    ("internal", KvxferError),
    ("no-such-kind", KvxferError),
]


@pytest.mark.parametrize(("kind", "cls"), KINDS)
def test_a_reported_kind_is_raised_again_as_its_class(kind, cls):
    assert error_class(kind) is cls


@pytest.mark.parametrize(("kind", "cls"), KINDS)
def test_side_channel_replies_raise_the_same_class_as_rank_replies(kind, cls):
    """Once two maps disagreed: "allocation" was an AllocationError from a rank and a bare
    KvxferError from a peer."""
    with pytest.raises(KvxferError) as info:
        raise_for_reply(m.ErrorReply(kind=kind, message="no free blocks"), peer="prefill-0")
    assert type(info.value) is cls
    assert str(info.value) == f"peer prefill-0 answered {kind}: no free blocks"


def test_the_engine_and_decode_raise_the_tree_s_own_classes():
    from kvxfer import errors
    from kvxfer.daemons.decode import LoadFailed
    from kvxfer.engine import AllocationError as EngineAllocationError

    assert (EngineAllocationError, LoadFailed) == (errors.AllocationError, errors.LoadFailed)
