"""Side-channel clients by address: a bounded cache, the address of each rank of a service, and
calls to several ranks at once.

Addresses come from transfer parameters, which HTTP clients send: without a bound every forged
address would keep a client (a socket and a monitor) forever, so the least recently used client is
closed when a new address comes past `capacity`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from kvxfer.agents import messages as m
from kvxfer.agents.sidechannel.client import ClientConfig, PendingCall, SideChannelClient
from kvxfer.errors import ConfigError, KvxferError

MAX_CLIENTS = 64  # distinct producer addresses a consumer keeps a client for
_MAX_PARALLEL = 8  # side-channel calls in flight at once (one per producer rank)


def rank_address(base: str, rank: int) -> str:
    """Rank r of a service listens on the base address's port + r."""
    try:
        parts = urlsplit(base)
        port = parts.port
    except ValueError:  # e.g. "tcp://[" (an unclosed IPv6 host): as malformed as any other
        raise ConfigError(f"side_channel={base!r}: expected tcp://HOST:PORT") from None
    if parts.scheme != "tcp" or not parts.hostname or port is None:
        raise ConfigError(f"side_channel={base!r}: expected tcp://HOST:PORT")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"tcp://{host}:{port + rank}"


@dataclass(frozen=True)
class Target:
    """One server: its address and, when the request names it (the vLLM connector's drop-in
    mode), its CURVE public key; else the client's configured server key is used."""

    address: str
    server_key: bytes | None = None


def producer_target(params: m.TransferParams, rank: int) -> Target:
    """Rank `rank` of the producer that issued `params`."""
    key = params.producer_key.encode() if params.producer_key else None
    return Target(rank_address(params.side_channel, rank), key)


class ClientCache:
    def __init__(self, config: ClientConfig, capacity: int = MAX_CLIENTS) -> None:
        self.config = config
        self.capacity = capacity
        self._clients: OrderedDict[Target, SideChannelClient] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def get(self, target: Target | str) -> SideChannelClient:
        target = Target(target) if isinstance(target, str) else target
        with self._lock:
            client = self._clients.pop(target, None) or SideChannelClient(target.address, self._config_for(target))
            self._clients[target] = client
            evicted = [self._clients.popitem(last=False)[1] for _ in range(len(self._clients) - self.capacity)]
        for old in evicted:
            old.close()
        return client

    def _config_for(self, target: Target) -> ClientConfig:
        keys = self.config.keys
        if target.server_key is None or keys is None:
            return self.config
        return dataclasses.replace(self.config, keys=dataclasses.replace(keys, server_public_key=target.server_key))

    def request(self, target: Target | str, msg: m.Message, *, timeout_s: float) -> m.Message:
        return self.get(target).request(msg, timeout_s=timeout_s)

    def call(self, target: Target | str, msg: m.Message, *, timeout_s: float) -> PendingCall:
        """`msg` sent, its reply taken later (SideChannelClient.call)."""
        return self.get(target).call(msg, timeout_s=timeout_s)

    def request_all(self, calls: Sequence[tuple[Target, m.Message]], *,
                    timeout_s: float) -> list[m.Message | KvxferError]:
        """Each (server, message) sent at once; each reply, or the error its call ended with, in
        order. Every call ends by `timeout_s`."""
        if len(calls) == 1:
            return [self._outcome(*calls[0], timeout_s)]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_MAX_PARALLEL, thread_name_prefix="kvxfer-sidechannel")
            pool = self._pool
        futures = [pool.submit(self._outcome, address, msg, timeout_s) for address, msg in calls]
        return [f.result() for f in futures]

    def _outcome(self, target: Target, msg: m.Message, timeout_s: float) -> m.Message | KvxferError:
        try:
            return self.request(target, msg, timeout_s=timeout_s)
        except KvxferError as err:
            return err

    def __len__(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), OrderedDict()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for client in clients:
            client.close()
