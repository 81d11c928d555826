"""A process started on a host as a pod's container (`Host.pod_command`) has the pod's hostname,
which resolves to the host's address, as in a Kubernetes pod (the kubelet writes the pod's name and
IP into its /etc/hosts). That is what the vLLM connector's drop-in configuration binds and
advertises (`kvxfer.integrations.vllm.config.this_host`), so across hosts it needs no address
configured. A plain `Host.command` keeps this machine's name, which does not resolve to the host's
address: there the drop-in connector would advertise an address the other host cannot reach."""

from __future__ import annotations

import socket
import subprocess
import sys

RESOLVE = ("import socket; from kvxfer.integrations.vllm.config import this_host; "
           "a = this_host(); s = socket.socket(); s.bind((a, 0)); print(socket.gethostname(), a)")


def _resolved(argv: list[str]) -> list[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_pod_binds_the_address_its_own_name_resolves_to(topology):
    for host in topology.hosts.values():
        assert _resolved(host.pod_command([sys.executable, "-c", RESOLVE])) == [host.hostname, host.address]
    assert socket.gethostname() not in [h.hostname for h in topology.hosts.values()]  # this machine kept its name


def test_outside_a_pod_the_machines_name_does_not_resolve_to_the_host(topology):
    decode = topology.host("decode")
    name, address = _resolved(decode.command([sys.executable, "-c", RESOLVE]))
    assert name == socket.gethostname() and address != decode.address
