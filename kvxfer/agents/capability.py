"""Transfer parameters as a capability: the producer signs them, the consumer checks them.

Parameters travel from a producer through HTTP clients and proxies to a consumer, so the consumer
must refuse any it was not issued (another request's block ids, a made-up transfer id) before a
byte moves, and without asking the producer on the request's critical path. So:

- Every producer instance has a master secret, derived by each of its processes from the
  instance's own CURVE secret key and boot epoch (`master_secret`): nothing secret is ever sent
  between them, and a restart changes it.
- At handshake a producer rank hands the consumer, over the authenticated and encrypted side
  channel, the key for that consumer's identity (`Signer.key_for`), never the master.
- A producer signs parameters with the key of the consumer they are bound to (`Signer.sign`);
  the consumer rank checks the MAC with the key it was handed (`check`). A forged field, or
  parameters bound to another consumer, fail the check.
- `OnceOnly` makes each transfer id usable once per consumer rank: parameters replayed after
  the lease ended (its blocks since reused) are refused too.
- The other way round, a consumer rank's push request (`PushAsk`, a NIXL notification: no
  authenticated channel carries it) is signed with a key derived from the consumer's own key
  (`ask_key`), which the producer derives alike from the identity that handshook; a producer
  admits one push per consumer rank and request, so a replayed ask moves nothing.

What this does not stop (docs/security.md): a consumer that holds its key can sign parameters
for itself; such a consumer can already read the producer's registered memory through NIXL.
In insecure mode (`--insecure-plaintext`) the master is derived from public facts: a check
against mistakes, not attackers.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict

import msgspec

from kvxfer.agents.messages import Binding, PushAsk, TransferParams
from kvxfer.errors import AuthError

MAC_HEX = 32  # 128 bits
_MASTER = b"kvxfer-params-master-v2|"
_KEY = b"kvxfer-params-key-v2|"
_ASK = b"kvxfer-push-ask-v3|"  # a separate key: an ask's MAC is never a valid parameters' MAC


def master_secret(instance_secret: bytes | None, *, engine_id: str, boot_epoch: int) -> bytes:
    """The signing secret every process of one producer instance derives alike. Without a CURVE
    secret (insecure mode) it is derived from the engine id: anyone can compute it."""
    seed = instance_secret if instance_secret is not None else b"insecure|" + engine_id.encode()
    return hmac.digest(seed, _MASTER + str(boot_epoch).encode(), "sha256")


def identity_of_binding(binding: Binding) -> str:
    """Who parameters are bound to, as `key_for` names it ("" for unbound parameters)."""
    if binding.consumer_key:
        return f"key:{binding.consumer_key}"
    if binding.consumer_engine_id:
        return f"engine:{binding.consumer_engine_id}"
    return ""


def identity_of_peer(public_key: str | None, engine_id: str) -> str:
    """Who a handshaking consumer is: its authenticated CURVE key, else (insecure) its engine id."""
    return f"key:{public_key}" if public_key else f"engine:{engine_id}"


class Signer:
    """A producer's view: the key of each consumer identity, and signing."""

    def __init__(self, master: bytes) -> None:
        self._master = master

    def key_for(self, identity: str) -> bytes:
        return hmac.digest(self._master, _KEY + identity.encode(), "sha256")

    def sign(self, params: TransferParams) -> TransferParams:
        key = self.key_for(identity_of_binding(params.binding))
        return msgspec.structs.replace(params, mac=mac_of(params, key))


def mac_of(params: TransferParams, key: bytes) -> str:
    """HMAC-SHA256 (first 128 bits, hex) over every field of the parameters but the MAC."""
    fields = (params.protocol_version, params.engine_id, params.boot_epoch, params.request_id,
              params.block_ids, params.side_channel, params.tp_size, params.binding.consumer_key,
              params.binding.consumer_engine_id, params.num_tokens, params.first_token_id,
              params.lease_s, params.expires_unix_ms)
    return hmac.digest(key, msgspec.msgpack.encode(fields), "sha256").hex()[:MAC_HEX]


def ask_key(consumer_key: bytes) -> bytes:
    """The key a consumer signs its push requests with, from the key of its own identity (the
    producer's `Signer.key_for(identity)`, which the consumer got at handshake)."""
    return hmac.digest(consumer_key, _ASK, "sha256")


def sign_ask(ask: PushAsk, key: bytes) -> PushAsk:
    return msgspec.structs.replace(ask, mac=_ask_mac(ask, key))


def check_ask(ask: PushAsk, key: bytes) -> None:
    """Raise AuthError unless `ask` carries the MAC its consumer computes with `key`."""
    if not ask.mac or not hmac.compare_digest(ask.mac, _ask_mac(ask, key)):
        raise AuthError(f"push request for {ask.request_id[:8]} from decode {ask.decode_engine_id} rank "
                        f"{ask.decode_rank} fails its MAC check: not sent by the consumer that handshook "
                        f"with that NIXL agent, or altered on the way; refusing")


def _ask_mac(ask: PushAsk, key: bytes) -> str:
    fields = (ask.protocol_version, ask.request_id, ask.decode_rank, ask.block_ids, ask.decode_engine_id,
              ask.staging_offsets, ask.not_after_unix)
    return hmac.digest(key, msgspec.msgpack.encode(fields), "sha256").hex()[:MAC_HEX]


def check(params: TransferParams, key: bytes) -> None:
    """Raise AuthError unless `params` carry the MAC the producer computes with `key`."""
    if not params.mac:
        raise AuthError(f"transfer parameters of {params.request_id[:8]} carry no MAC; refusing before any "
                        f"transfer (a producer of protocol {params.protocol_version} signs every request)")
    if not hmac.compare_digest(params.mac, mac_of(params, key)):
        raise AuthError(f"transfer parameters of {params.request_id[:8]} fail their MAC check: block ids, token "
                        f"count, binding or another field differ from what producer {params.engine_id} issued "
                        f"(or they are bound to another consumer); refusing before any transfer")


class OnceOnly:
    """Transfer ids a consumer rank has used, each kept until its lease could have ended; at most
    `capacity` (the oldest go first: a flood of ids cannot grow it without bound)."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()  # id -> wall clock it may be forgotten
        self._lock = threading.Lock()  # a consumer may load several requests at once

    def use(self, params: TransferParams, *, now: float | None = None) -> None:
        with self._lock:
            self._use(params, time.time() if now is None else now)

    def _use(self, params: TransferParams, now: float) -> None:
        while self._seen and (next(iter(self._seen.values())) < now or len(self._seen) >= self.capacity):
            self._seen.popitem(last=False)
        if params.request_id in self._seen:
            raise AuthError(f"transfer parameters of {params.request_id[:8]} were already used by this consumer; "
                            f"refusing a replay (their blocks may hold another request's KV by now)")
        forget_at = max(now, params.expires_unix_ms / 1e3) + 2 * params.lease_s
        self._seen[params.request_id] = forget_at
