"""A TCP relay in front of prefill's side channel, so the soak can drop its connections.

Prefill listens on 127.0.0.1:BASE+r and advertises 127.0.0.2 (`--advertise-host`); every decode
rank therefore reaches prefill rank r through this relay on 127.0.0.2:BASE+r. `drop_all()` resets
every relayed connection at once (RST, like a node's conntrack flush or a pod network blip): ZeroMQ
sees the disconnect, calls in flight fail with PeerGoneError, and the next call reconnects.
Only the side channel goes through here; NIXL's own connections do not.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import struct
import threading

from kvxfer.errors import ConfigError

log = logging.getLogger(__name__)
ADVERTISED_HOST = "127.0.0.2"
_CHUNK = 1 << 16


class SideChannelRelay:
    def __init__(self, ports: list[int], *, listen_host: str = ADVERTISED_HOST,
                 target_host: str = "127.0.0.1") -> None:
        self.ports = ports
        self.listen_host = listen_host
        self.target_host = target_host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvxfer-soak-relay", daemon=True)
        self._servers: list[asyncio.base_events.Server] = []
        self._conns: set[asyncio.StreamWriter] = set()
        self.num_relayed = 0

    def start(self) -> None:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10.0)
        except OSError as err:
            self.stop()
            raise ConfigError(f"soak relay: cannot listen on {self.listen_host}:{self.ports}: {err}") from None

    def stop(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)

    def drop_all(self) -> int:
        """Reset every relayed connection now; returns how many sockets were reset."""
        return asyncio.run_coroutine_threadsafe(self._drop(), self._loop).result(10.0)

    # ---- relay thread -----------------------------------------------------------------------

    async def _listen(self) -> None:
        for port in self.ports:
            server = await asyncio.start_server(functools.partial(self._relay, port=port),
                                                self.listen_host, port, reuse_address=True)
            self._servers.append(server)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(self.target_host, port), 5.0)
        except (OSError, asyncio.TimeoutError):
            writer.close()  # prefill is down: the client sees a refused/closed connection
            return
        self.num_relayed += 1
        self._conns.update((writer, up_writer))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio's stream callback reports a cancelled task as an error)
        finally:
            for w in (writer, up_writer):
                self._conns.discard(w)
                w.close()

    async def _drop(self) -> int:
        dropped = list(self._conns)
        for writer in dropped:
            sock = writer.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            self._conns.discard(writer)
        return len(dropped)

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        await self._drop()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:  # the relays of dropped connections: end them before the loop stops
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or error; bounded by the connection's life (the relay drops it at the end)."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
