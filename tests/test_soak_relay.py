"""The soak's side-channel relay: relays both ways, `drop_all` resets live connections (the
peer sees a reset, as after a network blip), new connections are relayed again, stop is clean."""

from __future__ import annotations

import socket
import threading

import pytest

from kvxfer.soak.relay import SideChannelRelay


@pytest.fixture
def echo_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve(conn: socket.socket) -> None:
        try:
            while data := conn.recv(100):
                conn.sendall(data)
        except OSError:
            pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def test_relay_drop_and_reconnect(echo_port):
    relay = SideChannelRelay([echo_port])
    relay.start()
    try:
        first = socket.create_connection(("127.0.0.2", echo_port), timeout=5)
        first.sendall(b"hi")
        assert first.recv(10) == b"hi"
        assert relay.drop_all() == 2  # both legs of the one connection
        with pytest.raises(OSError):
            first.sendall(b"x")
            if not first.recv(10):
                raise ConnectionResetError("closed")
        second = socket.create_connection(("127.0.0.2", echo_port), timeout=5)
        second.sendall(b"again")
        assert second.recv(10) == b"again"
        assert relay.num_relayed == 2
    finally:
        relay.stop()
