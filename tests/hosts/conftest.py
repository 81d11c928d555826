"""Two hosts on this machine (kvxfer.hosts: network namespaces on a switch). Every test here needs
namespaces; where they cannot be made (not root, no iproute2) they are skipped with the reason.

Markers: `hosts` on every test here; `hosts_full` on the long fault tests, which only
`make test-hosts` runs (`pytest tests/hosts -m hosts`). A run without `-m` (the main `pytest` of
`make test`) deselects them and keeps the short version.
"""

from __future__ import annotations

import pytest
from hostkit import namespaces_or_skip

from kvxfer.hosts import Topology


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hosts: needs network namespaces (root); tests/hosts")
    config.addinivalue_line("markers", "hosts_full: the long two-host fault tests (`make test-hosts`)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/hosts/" in item.nodeid or item.nodeid.startswith("hosts/"):
            item.add_marker(pytest.mark.hosts)
    if config.option.markexpr:
        return  # the run chose by marker (make test-hosts: -m hosts)
    full = [item for item in items if item.get_closest_marker("hosts_full")]
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = [item for item in items if not item.get_closest_marker("hosts_full")]


@pytest.fixture
def topology():
    """Prefill's and decode's hosts, torn down after the test whatever happened."""
    namespaces_or_skip()
    with Topology() as topo:
        yield topo
