"""Transfer parameters as a capability (kvxfer.agents.capability): what a consumer rank checks
locally before any byte moves. Every signed field, altered, fails the check; so do another
consumer's key, another producer instance's or epoch's secret, and a second use."""

from __future__ import annotations

import msgspec
import pytest

from kvxfer.agents import capability as cap
from kvxfer.agents import messages as m
from kvxfer.errors import AuthError

SECRET = b"s" * 32
CONSUMER = "k" * 40


def signer(secret: bytes | None = SECRET, epoch: int = 7) -> cap.Signer:
    return cap.Signer(cap.master_secret(secret, engine_id="prefill0", boot_epoch=epoch))


def params(**changes: object) -> m.TransferParams:
    base = m.TransferParams(engine_id="prefill0", boot_epoch=7, request_id=m.new_request_id(), block_ids=[4, 9, 2],
                            side_channel="tcp://10.0.0.2:5600", tp_size=2, binding=m.Binding(consumer_key=CONSUMER),
                            num_tokens=40, first_token_id=17, lease_s=30.0, expires_unix_ms=1_900_000_000_000)
    return msgspec.structs.replace(base, **changes)


def key_of_consumer(s: cap.Signer) -> bytes:
    return s.key_for(cap.identity_of_peer(CONSUMER, "decode0"))


def test_signed_parameters_pass_and_survive_json():
    s = signer()
    signed = s.sign(params())
    cap.check(m.decode_params(m.encode_params(signed)), key_of_consumer(s))


@pytest.mark.parametrize("field, value", [
    ("block_ids", [4, 9, 3]), ("block_ids", [4, 9]), ("request_id", "f" * 32), ("num_tokens", 41),
    ("tp_size", 1), ("boot_epoch", 8), ("engine_id", "prefill1"), ("side_channel", "tcp://10.0.0.9:5600"),
    ("first_token_id", 18), ("lease_s", 300.0), ("expires_unix_ms", 1_900_000_100_000),
    ("binding", m.Binding(consumer_key="x" * 40)), ("protocol_version", 1),
])
def test_every_altered_field_fails_the_check(field, value):
    s = signer()
    forged = msgspec.structs.replace(s.sign(params()), **{field: value})
    with pytest.raises(AuthError, match="fail their MAC check"):
        cap.check(forged, key_of_consumer(s))


def test_another_consumer_instance_or_epoch_cannot_check_or_forge():
    s = signer()
    signed = s.sign(params())
    for key in (s.key_for(cap.identity_of_peer("y" * 40, "decode1")),  # another consumer
                key_of_consumer(signer(b"t" * 32)),  # another producer instance
                key_of_consumer(signer(epoch=8))):  # the same producer after a restart
        with pytest.raises(AuthError):
            cap.check(signed, key)


def test_unsigned_parameters_are_refused_saying_why():
    with pytest.raises(AuthError, match="carry no MAC"):
        cap.check(params(), key_of_consumer(signer()))


def test_insecure_identities_are_engine_ids_and_unbound_parameters_have_their_own_key():
    s = signer(None)
    assert cap.identity_of_binding(m.Binding(consumer_engine_id="decode0")) == cap.identity_of_peer(None, "decode0")
    unbound = s.sign(params(binding=m.Binding()))
    cap.check(unbound, s.key_for(""))
    with pytest.raises(AuthError):
        cap.check(unbound, s.key_for(cap.identity_of_peer(None, "decode0")))


def test_parameters_are_usable_once_and_forgotten_after_their_lease():
    once = cap.OnceOnly(capacity=4)
    first = params(expires_unix_ms=1_000_000)  # a lease ending at t = 1000 s
    once.use(first, now=900.0)
    with pytest.raises(AuthError, match="already used"):
        once.use(first, now=950.0)
    once.use(first, now=1000.0 + 2 * first.lease_s + 1)  # long after: the lease check refuses it


def test_the_replay_memory_is_bounded():
    once = cap.OnceOnly(capacity=3)
    for _ in range(10):
        once.use(params(), now=0.0)
    assert len(once._seen) <= 3
