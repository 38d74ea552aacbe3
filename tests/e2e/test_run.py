"""`gateway run` as an operator starts it, in network namespaces: what its start-up line says about where the
API listens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Topology, live_namespaces, wait_for_line

REPO = Path(__file__).resolve().parents[2]
TOKEN = "run-test-admin-token-0123456789"
API_PORT = 8470
EGRESS_PORT = 15001


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with Topology(sandboxes=1, origins=1) as topology:
        yield topology
    assert live_namespaces(topology.prefix) == []


def write_config(directory: Path, api_host: str) -> Path:
    config = directory / "gateway.toml"
    config.write_text(
        "\n".join(
            [
                "[store]",
                'backend = "embedded"',
                f'path = "{directory / "policies.json"}"',
                "[api]",
                f'host = "{api_host}"',
                f"port = {API_PORT}",
                f'tokens = [{{ name = "ops", token = "{TOKEN}", scopes = ["admin"] }}]',
                "[audit]",
                f'dir = "{directory / "audit"}"',
                "[log]",
                'format = "json"',
                "[egress]",
                f"listen_port = {EGRESS_PORT}",
            ]
        )
        + "\n"
    )
    return config


def start(topo: Topology, directory: Path, config: Path, *flags: str) -> subprocess.Popen[Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with (directory / "gateway.log").open("a") as log:
        return topo.popen(
            "gw", [sys.executable, "-m", "gateway.cli", "run", *flags, "--config", str(config)], stderr=log, env=env
        )


@pytest.mark.root
@pytest.mark.parametrize(
    ("host", "said", "reached_as"),
    [
        (
            "0.0.0.0",
            f"0.0.0.0:{API_PORT} (every IPv4 address; from this host http://127.0.0.1:{API_PORT})",
            "198.18.0.2",
        ),
        ("::", f"[::]:{API_PORT} (every IPv6 address; from this host http://[::1]:{API_PORT})", "[2001:db8:ff::2]"),
        ("198.18.0.2", f"http://198.18.0.2:{API_PORT}", "198.18.0.2"),
    ],
)
def test_the_start_up_line_says_where_the_api_really_listens(
    topo: Topology, tmp_path: Path, host: str, said: str, reached_as: str
) -> None:
    config = write_config(tmp_path, host)
    gateway = start(topo, tmp_path, config)
    try:
        line = wait_for_line(gateway, "gateway API listening", 20).strip()
        assert line == f"gateway API listening on {said}, store embedded {tmp_path / 'policies.json'}"
        # It is reachable where it says: from the internet namespace, at the gateway's own address.
        auth = ["-H", f"Authorization: Bearer {TOKEN}"]
        out = topo.run("inet", ["curl", "-sS", "-g", "-m", "3", *auth, f"http://{reached_as}:{API_PORT}/v1/status"])
        assert json.loads(out.stdout)["backend"] == "embedded", out.stdout
    finally:
        topo.kill(gateway)
    checked = topo.run("gw", [sys.executable, "-m", "gateway.cli", "check-config", "--config", str(config)])
    assert f"api:             {said}\n" in checked.stdout, checked.stdout
