"""`gateway run --data-plane --steer` shutting down: SIGTERM drains (new connections reset at once, /readyz 503
DRAINING, open flows go on up to `egress.drain_timeout`, then what is left is cut); a second signal closes at
once. Same origins and zone as test_egress (port 23 answers once the client's FIN came through)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.workers import worker_index
from tests.factory import EgressEnv, egress_policies, egress_world, wait_until
from tests.netns import Topology, live_namespaces, wait_for_line

#: A long-lived flow: connect to the port-23 origin, say hello, print "ready", wait for the file argv[2] to
#: exist, then half-close and print what the origin answers ("GOT 5") or how the connection ended.
LONG_FLOW = r"""
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], 23), timeout=30)
s.sendall(b"\x00\x01\x02\x03\x04")  # not text: opaque at once, so the flow is relayed
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.02)
try:
    s.shutdown(socket.SHUT_WR)
    data = s.recv(4096)
    print(data.decode().strip() or "EOF", flush=True)
except OSError:  # reset, or already gone (ENOTCONN)
    print("RESET", flush=True)
"""
WORKER_SANDBOX = "beta"
ORIGIN = "198.18.1.4"  # sb1 may reach it (allow_cidrs), opaque TCP included


def _worker_sandbox() -> dict[str, Any]:
    assert worker_index(WORKER_SANDBOX, 2) == 1
    return {
        "id": WORKER_SANDBOX,
        "addresses": ["10.75.0.2"],
        "profile": "allowlisted",
        "egress": {"allow_cidrs": [f"{ORIGIN}/32"]},
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressEnv]:
    with Topology(sandboxes=2, origins=4) as topo:
        e = egress_world(topo, tmp_path_factory.mktemp("lifecycle"))
        policies = egress_policies()
        # sb2's address as a sandbox that worker 1 of two serves (`worker_index`), so a worker's drain is seen too.
        policies["sandboxes"] = {"sb1": policies["sandboxes"]["sb1"], WORKER_SANDBOX: _worker_sandbox()}
        e.write_policies(policies)
        yield e
        if e.gateway is not None and e.gateway.poll() is None:
            e.gateway.kill()
    assert live_namespaces(topo.prefix) == []


def _start(env: EgressEnv, drain_timeout: float, *extra: str) -> None:
    env.log_file.write_text("")
    env.environment["GATEWAY_EGRESS__DRAIN_TIMEOUT"] = str(drain_timeout)
    env.start_gateway(*extra)


def _long_flow(env: EgressEnv, trigger: Path, sandbox: str = "sb1") -> Any:
    """The flow, once the gateway has dialled the origin for it (it is relayed, not still being accepted)."""
    flow = env.topo.start_python(sandbox, LONG_FLOW, ORIGIN, str(trigger))
    dialled = ["ss", "-Htn", "state", "established", "dst", f"{ORIGIN}:23"]
    assert wait_until(lambda: env.topo.run("gw", dialled, check=False).stdout.strip(), 5)
    return flow


def _draining(env: EgressEnv) -> bool:
    return '"DRAINING"' in env.readyz().stdout


def _exit_code(env: EgressEnv, timeout: float) -> int | None:
    gateway = env.gateway
    assert gateway is not None
    wait_until(lambda: gateway.poll() is not None, timeout)
    return gateway.poll()


def _new_connection_refused_at_once(env: EgressEnv, sandbox: str) -> None:
    fetched = env.curl(sandbox, f"http://{ORIGIN}/", timeout=3)
    assert fetched.returncode in (7, 56), fetched  # reset (56), or refused in connect (7): never a hang (28)


@pytest.mark.parametrize(("workers", "sandbox"), [("1", "sb1"), ("2", "sb2")])  # sb2: served by worker 1
def test_sigterm_lets_an_open_flow_finish_refuses_new_ones_and_says_draining(
    env: EgressEnv, tmp_path: Path, workers: str, sandbox: str
) -> None:
    _start(env, 30, "--workers", workers)
    trigger = tmp_path / "finish"
    flow = _long_flow(env, trigger, sandbox)
    assert env.gateway is not None
    env.gateway.send_signal(signal.SIGTERM)
    assert wait_until(lambda: _draining(env), 5), env.readyz().stdout
    _new_connection_refused_at_once(env, sandbox)
    assert env.gateway.poll() is None  # the open flow holds the drain
    trigger.touch()
    assert wait_for_line(flow, "", 10).strip() == "GOT 5"
    assert _exit_code(env, 10) == 0
    assert [e["open_flows"] for e in env.log_events("gateway.draining")] in ([1], [1, 0], [0, 1])
    assert [e["cut"] for e in env.log_events("gateway.drained")] in ([0], [0, 0])


def test_the_drain_ends_at_its_bound_and_cuts_what_is_left(env: EgressEnv, tmp_path: Path) -> None:
    _start(env, 1.5)
    trigger = tmp_path / "finish"
    flow = _long_flow(env, trigger)
    assert env.gateway is not None
    env.gateway.send_signal(signal.SIGTERM)
    assert _exit_code(env, 10) == 0
    assert env.log_events("gateway.drained")[0]["cut"] == 1
    began, ended = (
        datetime.fromisoformat(env.log_events(e)[0]["timestamp"]) for e in ("gateway.draining", "gateway.drained")
    )
    # The flow was given its bound: libuv's timers count whole milliseconds of a clock it caches per loop turn, so
    # the bound's wait may end up to a millisecond or so before 1.5 s of wall clock have passed.
    assert (ended - began).total_seconds() >= 1.495
    trigger.touch()
    assert wait_for_line(flow, "", 10).strip() in ("RESET", "EOF")


def test_a_second_signal_during_the_drain_closes_at_once(env: EgressEnv, tmp_path: Path) -> None:
    _start(env, 600)
    flow = _long_flow(env, tmp_path / "finish")
    assert env.gateway is not None
    env.gateway.send_signal(signal.SIGTERM)
    assert wait_until(lambda: _draining(env), 5)
    env.gateway.send_signal(signal.SIGINT)
    assert _exit_code(env, 10) == 0
    assert env.log_events("gateway.drained")[0]["cut"] == 1
    (tmp_path / "finish").touch()
    assert wait_for_line(flow, "", 10).strip() in ("RESET", "EOF")
