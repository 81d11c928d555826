"""`kvxfer soak --hosts`: link faults need hosts of their own, and the CLI's default fault mix
follows the topology (no namespaces needed here)."""

from __future__ import annotations

import argparse

import pytest

from kvxfer.commands.soak import config_from_args, register
from kvxfer.errors import ConfigError
from kvxfer.soak.config import FAULT_KINDS, LINK_DOWN, SoakConfig


def parse(*argv: str) -> SoakConfig:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return config_from_args(parser.parse_args(["soak", *argv]))


def test_link_faults_on_loopback_are_refused_naming_the_kind_and_the_hosts():
    with pytest.raises(ConfigError, match=r"\['link_down'\] not possible with hosts=1"):
        SoakConfig(weights={LINK_DOWN: 1.0}).validate()


def test_hosts_outside_the_choices_are_refused():
    with pytest.raises(ConfigError, match="hosts=3 is not one of 1, 2"):
        SoakConfig(hosts=3).validate()


def test_the_default_mix_follows_the_topology():
    assert set(parse().weights) == set(FAULT_KINDS)
    two = parse("--hosts", "2", "--max-link-down-s", "4")
    assert set(two.weights) == {*FAULT_KINDS, LINK_DOWN} and two.hosts == 2 and two.max_link_down_s == 4.0
    assert set(parse("--hosts", "2", "--fault-kinds", "link_down").weights) == {LINK_DOWN}
