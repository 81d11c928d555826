import pytest

from kvxfer.errors import (
    AuthError,
    HandshakeError,
    KvxferError,
    LeaseError,
    TransferTimeout,
    error_class,
)


@pytest.mark.parametrize("kind,cls", [("timeout", TransferTimeout), ("auth", AuthError),
                                      ("lease", LeaseError), ("incompatible", HandshakeError),
                                      ("no-such-kind", KvxferError)])
def test_error_class_by_kind(kind, cls):
    assert error_class(kind) is cls
    assert str(error_class(kind)("rank 1: boom")) == "rank 1: boom"
