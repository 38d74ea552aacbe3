"""End-to-end fixtures: real network namespaces (see tests/netns.py). Root-only tests skip when not root."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.netns` is importable however pytest was started
    sys.path.insert(0, str(REPO))

from tests.netns import Topology, live_namespaces  # noqa: E402

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, nftables)")
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    """Three sandboxes, a gateway and an internet namespace, deleted after the module (also on failure)."""
    with Topology(sandboxes=3) as topo:
        yield topo
    assert live_namespaces(topo.prefix) == [], "namespaces left behind"


@pytest.fixture
def make_topology() -> Iterator[Callable[..., Topology]]:
    """Build extra topologies inside one test; all are torn down after it."""
    made: list[Topology] = []

    def make(**kwargs: Any) -> Topology:
        topo = Topology(**kwargs).__enter__()
        made.append(topo)
        return topo

    yield make
    for topo in made:
        topo.close()
        assert live_namespaces(topo.prefix) == [], "namespaces left behind"
