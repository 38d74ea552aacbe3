"""`gateway run --data-plane --steer --workers 2` in network namespaces: two egress processes, each sandbox's TCP
to the one that serves it, DNS-learned addresses carried to that worker, a dead worker restarted, and workers
that never outlive the main process. Same origins and zone as test_egress."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.workers import worker_index
from tests import authdns
from tests.factory import (
    BANNER_CLIENT,
    EGRESS_ZONE,
    ORIGINS,
    EgressEnv,
    assert_dns_answer_unlocks_opaque_tcp,
    pin,
    wait_until,
)
from tests.netns import INET_V4, Topology, live_namespaces, wait_for_line

#: One sandbox per worker (`worker_index` of the id decides, as in the gateway).
MAIN_SANDBOX, WORKER_SANDBOX = "alpha", "beta"


def _policies() -> dict[str, object]:
    def sandbox(sandbox_id: str, address: str) -> dict[str, object]:
        return {
            "id": sandbox_id,
            "addresses": [address],
            "profile": "allowlisted",
            "egress": {"allow_hosts": ["allowed.test"]},
        }

    return {
        "templates": {},
        "sandboxes": {
            MAIN_SANDBOX: sandbox(MAIN_SANDBOX, "10.75.0.1"),
            WORKER_SANDBOX: sandbox(WORKER_SANDBOX, "10.75.0.2"),
        },
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressEnv]:
    assert (worker_index(MAIN_SANDBOX, 2), worker_index(WORKER_SANDBOX, 2)) == (0, 1)
    with Topology(sandboxes=2, origins=4) as topo:
        e = EgressEnv(topo, tmp_path_factory.mktemp("workers"))
        topo.attach_with_cli()
        topo.start_python("inet", authdns.ZONE_SERVER_SCRIPT, str(INET_V4), json.dumps(EGRESS_ZONE))
        origins = topo.popen("inet", [sys.executable, "-u", "-c", ORIGINS, str(e.cert), str(e.key)])
        wait_for_line(origins, "ready", 10)
        e.write_policies(_policies())
        e.start_gateway("--workers", "2")
        yield e
    assert live_namespaces(topo.prefix) == []


def _worker_pids(env: EgressEnv) -> list[int]:
    assert env.gateway is not None
    found = subprocess.run(["pgrep", "-P", str(env.gateway.pid), "-f", "worker-index 1"], capture_output=True)
    return [int(pid) for pid in found.stdout.split()]


def _fetch(env: EgressEnv, sb: str, timeout: float = 6.0) -> subprocess.CompletedProcess[str]:
    return env.curl(sb, "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1"), timeout=timeout)


def _dead(pid: int) -> bool:
    """Gone, or a zombie: its files (the worker's listening socket) are closed either way."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _batch_pids(env: EgressEnv, sandbox: str) -> set[int]:
    directory = env.workdir / "audit" / sandbox
    return {int(path.stem.split("-")[1]) for path in directory.glob("*.ndjson")} if directory.is_dir() else set()


@pytest.mark.root
def test_each_sandbox_is_served_by_its_worker_process(env: EgressEnv) -> None:
    [worker] = _worker_pids(env)
    for sb in ("sb1", "sb2"):
        result = _fetch(env, sb)
        assert result.stdout.startswith("ORIGIN 198.18.1.1 host=allowed.test sni=allowed.test"), result
    assert env.gateway is not None
    wait_until(lambda: _batch_pids(env, MAIN_SANDBOX) and _batch_pids(env, WORKER_SANDBOX), timeout=5, interval=0.1)
    # Flow-record batches are named {ts_us}-{pid}: the process that decided each connection wrote them.
    assert _batch_pids(env, MAIN_SANDBOX) == {env.gateway.pid}
    assert _batch_pids(env, WORKER_SANDBOX) == {worker}


@pytest.mark.root
def test_dns_learned_addresses_reach_the_worker_that_serves_the_sandbox(env: EgressEnv) -> None:
    # Opaque TCP to 198.18.1.1:22 is allowed only once the sandbox's own DNS answer for allowed.test returned it;
    # the answer is given by the main process, the connection decided by worker 1.
    assert env.topo.python("sb2", BANNER_CLIENT, "198.18.1.1", "22").strip() == "RESET"
    assert_dns_answer_unlocks_opaque_tcp(env, "sb2")


@pytest.mark.root
def test_a_dead_worker_fails_closed_and_is_restarted(env: EgressEnv) -> None:
    [worker] = _worker_pids(env)
    os.kill(worker, signal.SIGKILL)
    # Dead (a zombie until the main process reaps it) means its listening socket is closed.
    assert wait_until(lambda: _dead(worker), timeout=5, interval=0.02)
    assert _fetch(env, "sb2", timeout=2).returncode != 0  # no listener: dropped, never forwarded
    assert _fetch(env, "sb1").returncode == 0  # the other worker's sandboxes are untouched

    def restarted() -> bool:
        pids = _worker_pids(env)
        return bool(pids) and pids != [worker] and _fetch(env, "sb2", timeout=2).returncode == 0

    if not wait_until(restarted, timeout=20, interval=0.5):
        pytest.fail("worker 1 was not restarted")
    restarts = [e for e in env.log_events("worker.exited") if e.get("worker") == 1]
    assert restarts and restarts[-1]["code"] == -signal.SIGKILL


@pytest.mark.root
def test_workers_stop_with_the_main_process(env: EgressEnv) -> None:
    [worker] = _worker_pids(env)
    assert env.gateway is not None
    env.gateway.send_signal(signal.SIGTERM)
    env.gateway.wait(timeout=20)
    assert wait_until(lambda: not os.path.exists(f"/proc/{worker}"), timeout=10, interval=0.1)
    assert _fetch(env, "sb2", timeout=2).returncode != 0
