"""Hosts on one machine for tests and the soak: network namespaces on a switch, partitions by
taking a link down. See README.md in this directory."""

from kvxfer.hosts.netns import NetnsError, sweep_stale, why_unavailable
from kvxfer.hosts.topology import UCX_TCP_ENV, Host, Topology

__all__ = ["UCX_TCP_ENV", "Host", "NetnsError", "Topology", "sweep_stale", "why_unavailable"]
