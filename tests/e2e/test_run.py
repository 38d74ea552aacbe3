"""`gateway run` as an operator starts it, in network namespaces: what its start-up line says about where the
API listens, and what `/readyz` says while a part of the data plane does not serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.factory import wait_until
from tests.netns import Topology, live_namespaces, wait_for_line

REPO = Path(__file__).resolve().parents[2]
TOKEN = "run-test-admin-token-0123456789"
API_PORT = 8470
EGRESS_PORT = 15001

#: Holds the port argv[1] on every IPv4 address without listening (and without SO_REUSEADDR), so an egress
#: worker cannot bind it, until it is killed.
PORT_HOLDER = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
threading.Event().wait()
"""


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


def readyz(topo: Topology) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{API_PORT}/readyz"
    out = topo.run("gw", ["curl", "-sS", "-m", "2", "-w", "\n%{http_code}", url], check=False)
    body, _, status = out.stdout.rpartition("\n")
    return int(status or 0), json.loads(body) if body else {}


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


@pytest.mark.root
def test_readyz_is_503_naming_what_does_not_serve_until_all_of_it_does(topo: Topology, tmp_path: Path) -> None:
    # Worker 1's port is taken, so that worker cannot listen (it exits and is restarted every second): the
    # gateway runs and its API answers, but it is not ready, and says why.
    holder = topo.start_python("gw", PORT_HOLDER, str(EGRESS_PORT + 1))
    gateway = start(topo, tmp_path, write_config(tmp_path, "127.0.0.1"), "--data-plane", "--steer", "--workers", "2")
    try:
        wait_for_line(gateway, "egress engine listening", 20)
        log = tmp_path / "gateway.log"
        assert wait_until(lambda: "worker.exited" in log.read_text(), timeout=15), log.read_text()
        for _ in range(2):  # while it starts and after it failed alike
            status, body = readyz(topo)
            assert (status, body.get("code")) == (503, "DATA_PLANE_NOT_READY"), (status, body)
            assert body["message"] == f"egress worker 1 does not listen on port {EGRESS_PORT + 1}", body
        topo.kill(holder)  # the next restart of the worker can listen
        wait_until(lambda: readyz(topo)[0] == 200, timeout=15, interval=0.1)
        answer = readyz(topo)
        assert answer[0] == 200, answer
        assert answer[1] == {"ready": True, "backend": "embedded"}
    finally:
        topo.kill(gateway)
