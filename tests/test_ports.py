"""Ports for local launches come from below the ephemeral range, so no outgoing connection of
any process can take one between picking it and listening on it."""

import socket

from kvxfer.ports import ephemeral_start, free_port, free_ports


def test_ports_are_free_consecutive_below_the_ephemeral_range_and_never_handed_out_twice(monkeypatch):
    import kvxfer.ports as ports

    monkeypatch.setattr(ports, "ephemeral_start", lambda: 32768)  # the Linux default, whatever this host says
    taken: set[int] = set()
    bases = [free_ports(4, taken) for _ in range(20)]
    assert len(taken) == 80  # no port handed out twice
    for base in bases:
        assert 20000 <= base and base + 4 <= ephemeral_start()
    with socket.socket() as s:  # and they are really free
        s.bind(("127.0.0.1", bases[0] + 3))
    assert free_port() < ephemeral_start()


def test_a_port_someone_listens_on_is_not_handed_out(monkeypatch):
    """The random pick is steered onto a busy port first (a collision cannot be caused on
    purpose otherwise): the bind check rejects it and the next pick is returned."""
    import kvxfer.ports as ports

    monkeypatch.setattr(ports, "ephemeral_start", lambda: 32768)  # so the random pick is the one used
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port()))
        busy.listen()
        port = busy.getsockname()[1]
        other = free_port()
        picks = iter([port, other])
        monkeypatch.setattr(ports.random, "randrange", lambda lo, hi: next(picks))
        assert free_ports(1) == other


def test_a_host_whose_ephemeral_range_starts_low_still_gets_ports(monkeypatch):
    import kvxfer.ports as ports

    monkeypatch.setattr(ports, "ephemeral_start", lambda: 1024)
    taken: set[int] = set()
    base = free_ports(3, taken)
    assert taken == {base, base + 1, base + 2} and base + 3 <= 65536


def test_a_rendezvous_port_is_never_one_a_launcher_hands_out():
    """A service's TP rendezvous listens on a port the kernel picked: in the ephemeral range,
    where `free_ports` (the cluster's HTTP and side-channel ports) never picks."""
    from kvxfer.ports import ephemeral_port

    first = ephemeral_start()
    assert all(ephemeral_port() >= first for _ in range(50))
    assert all(free_port() < first for _ in range(50))
