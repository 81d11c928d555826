"""Side-channel clients by address: a bounded cache, the address of each rank of a service, and
calls to several ranks at once.

Addresses come from transfer parameters, which HTTP clients send: without a bound every forged
address would keep a client (a socket and a monitor) forever, so the least recently used client is
closed when a new address comes past `capacity`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from kvxfer.agents import messages as m
from kvxfer.agents.sidechannel.client import ClientConfig, SideChannelClient
from kvxfer.errors import ConfigError, KvxferError

MAX_CLIENTS = 64  # distinct producer addresses a consumer keeps a client for
_MAX_PARALLEL = 8  # side-channel calls in flight at once (one per producer rank)


def rank_address(base: str, rank: int) -> str:
    """Rank r of a service listens on the base address's port + r."""
    parts = urlsplit(base)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None:
        raise ConfigError(f"side_channel={base!r}: expected tcp://HOST:PORT")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"tcp://{host}:{port + rank}"


class ClientCache:
    def __init__(self, config: ClientConfig, capacity: int = MAX_CLIENTS) -> None:
        self.config = config
        self.capacity = capacity
        self._clients: OrderedDict[str, SideChannelClient] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def get(self, address: str) -> SideChannelClient:
        with self._lock:
            client = self._clients.pop(address, None) or SideChannelClient(address, self.config)
            self._clients[address] = client
            evicted = [self._clients.popitem(last=False)[1] for _ in range(len(self._clients) - self.capacity)]
        for old in evicted:
            old.close()
        return client

    def request(self, address: str, msg: m.Message, *, timeout_s: float) -> m.Message:
        return self.get(address).request(msg, timeout_s=timeout_s)

    def request_all(self, calls: Sequence[tuple[str, m.Message]], *,
                    timeout_s: float) -> list[m.Message | KvxferError]:
        """Each (address, message) sent at once; each reply, or the error its call ended with, in
        order. Every call ends by `timeout_s`."""
        if len(calls) == 1:
            return [self._outcome(*calls[0], timeout_s)]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_MAX_PARALLEL, thread_name_prefix="kvxfer-sidechannel")
            pool = self._pool
        futures = [pool.submit(self._outcome, address, msg, timeout_s) for address, msg in calls]
        return [f.result() for f in futures]

    def _outcome(self, address: str, msg: m.Message, timeout_s: float) -> m.Message | KvxferError:
        try:
            return self.request(address, msg, timeout_s=timeout_s)
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
