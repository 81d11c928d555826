"""Checks of `kvxfer serve` settings that involve several of them; each failure names the flag
(or the variable it came from) and the value."""

from __future__ import annotations

import ipaddress

from kvxfer.daemons.enums import ModeChoice, TransferPathChoice
from kvxfer.daemons.resolve import Resolver
from kvxfer.daemons.settings import ServeConfig

WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]", "")  # bind addresses nobody can dial


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def advertise_host(s: Resolver, side_host: str) -> str:
    """The address peers use to reach the side channel: --advertise-host, else the bind address
    unless that is a wildcard."""
    advertised = s.text("--advertise-host", None)
    if advertised is not None:
        if advertised in WILDCARD_HOSTS:
            raise s.bad("--advertise-host", advertised, "peers cannot connect to a wildcard address")
        return advertised
    if side_host in WILDCARD_HOSTS:
        raise s.bad("--side-channel-host", side_host, "a wildcard: give --advertise-host, the address peers use")
    return side_host


def check_serve(config: ServeConfig, s: Resolver) -> None:
    _check_ports(config, s)
    if config.lease_s <= config.deadline.slack_s:
        why = f"must exceed --transfer-deadline-s={config.deadline.slack_s}, or blocks are freed while a transfer may still read them"
        raise s.bad("--lease-s", config.lease_s, why)
    if config.transfer_path is TransferPathChoice.STAGED and (config.mode is ModeChoice.READ or config.staging_mib == 0):
        why = "staged transfers are WRITEs into staging slots: use --mode write or auto and --staging-mib > 0"
        raise s.bad("--transfer-path", config.transfer_path.value, why)
    if config.insecure_plaintext and not is_loopback(config.side_channel_host):
        why = f"{s.source('--insecure-plaintext')} is for loopback only; use CURVE keys"
        raise s.bad("--side-channel-host", config.side_channel_host, why)


def _check_ports(config: ServeConfig, s: Resolver) -> None:
    last = config.side_channel_port + config.tp - 1
    if last > 65535:
        raise s.bad("--side-channel-port", config.side_channel_port, f"ranks 0..{config.tp - 1} need ports up to {last} > 65535")
    if config.port in config.side_channel_ports:
        raise s.bad("--port", config.port, f"collides with side-channel ports {config.side_channel_port}..{last}")
