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

from gateway.flowlog import FIELD_NAMES
from gateway.workers import worker_index
from tests.factory import (
    BANNER_CLIENT,
    NAMESPACE_API,
    SILENT_HOLDER,
    AuditTail,
    EgressEnv,
    allowlisted,
    assert_dns_answer_unlocks_opaque_tcp,
    delta,
    egress_world,
    pin,
    scrape,
    wait_until,
)
from tests.netns import Topology, live_namespaces, wait_for_line

#: One sandbox per worker (`worker_index` of the id decides, as in the gateway).
MAIN_SANDBOX, WORKER_SANDBOX = "alpha", "beta"


#: later.test: fetched only by the metrics test, so its rule's count moves by that test's connections alone.
HOSTS = ["allowed.test", "later.test"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressEnv]:
    assert (worker_index(MAIN_SANDBOX, 2), worker_index(WORKER_SANDBOX, 2)) == (0, 1)
    with Topology(sandboxes=2, origins=4) as topo:
        e = egress_world(topo, tmp_path_factory.mktemp("workers"))
        e.environment["GATEWAY_AUDIT__LOG_RECORDS"] = "false"  # the default: records are not console lines
        e.write_policies(allowlisted((MAIN_SANDBOX, "10.75.0.1", HOSTS), (WORKER_SANDBOX, "10.75.0.2", HOSTS)))
        e.start_gateway("--workers", "2")
        yield e
    assert live_namespaces(topo.prefix) == []


def _fetch(
    env: EgressEnv, sb: str, timeout: float = 6.0, host: str = "allowed.test", address: str = "198.18.1.1"
) -> subprocess.CompletedProcess[str]:
    return env.curl(sb, f"https://{host}/", *pin(host, 443, address), timeout=timeout)


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
    [worker] = env.worker_pids(1)
    for sb in ("sb1", "sb2"):
        result = _fetch(env, sb)
        assert result.stdout.startswith("ORIGIN 198.18.1.1 host=allowed.test sni=allowed.test"), result
    assert env.gateway is not None
    wait_until(lambda: _batch_pids(env, MAIN_SANDBOX) and _batch_pids(env, WORKER_SANDBOX), timeout=5, interval=0.1)
    # Batches are named {ts_us}-{pid}: the main process's flow log is the one sink, the worker sends it its records.
    assert _batch_pids(env, MAIN_SANDBOX) == {env.gateway.pid}
    assert _batch_pids(env, WORKER_SANDBOX) == {env.gateway.pid}
    assert worker != env.gateway.pid


@pytest.mark.root
def test_audit_tail_shows_every_workers_records_live_filtered(env: EgressEnv) -> None:
    everything = AuditTail(env, "--json")
    denials = AuditTail(env, "--json", "--deny")
    beta = AuditTail(env, WORKER_SANDBOX)  # human lines, one sandbox
    # The views subscribe when they have connected: until then a record may pass them by.
    assert wait_until(lambda: _fetch(env, "sb1").returncode == 0 and bool(everything.lines), timeout=15)
    assert wait_until(lambda: _fetch(env, "sb2").returncode == 0 and bool(beta.lines), timeout=15)
    assert env.curl("sb2", "https://denied.test/", *pin("denied.test", 443, "198.18.1.2")).returncode != 0

    def seen(tail: AuditTail, **fields: object) -> list[dict[str, object]]:
        return [r for r in tail.records() if all(r.get(k) == v for k, v in fields.items())]

    assert wait_until(lambda: seen(everything, sandbox=WORKER_SANDBOX, verdict="deny"), timeout=10)
    [deny] = seen(everything, sandbox=WORKER_SANDBOX, verdict="deny", hostname="denied.test")
    assert deny["protocol"] == "tls" and deny["rule"] and set(deny) == set(FIELD_NAMES)  # exactly the record's fields
    assert seen(everything, sandbox=MAIN_SANDBOX, verdict="allow", hostname="allowed.test")  # decided by worker 0
    assert seen(everything, sandbox=WORKER_SANDBOX, verdict="allow", hostname="allowed.test")  # by worker 1
    assert wait_until(lambda: seen(denials, hostname="denied.test"), timeout=10)
    assert {r["verdict"] for r in denials.records()} == {"deny"}
    assert wait_until(lambda: any(" DENY tls denied.test:443 -> " in line for line in beta.lines), timeout=10)
    assert all(f" {WORKER_SANDBOX} " in line for line in beta.lines), beta.lines
    [allowed] = [line for line in beta.lines if " allow tls allowed.test:443 -> 198.18.1.1:443 up=" in line][:1]
    assert ' reason="' in allowed and " rule=" in allowed
    # ... and the worker's records are in the audit batches too, which the API lists.
    batches = env.topo.run("gw", [sys.executable, "-m", "gateway.cli", "--api", NAMESPACE_API, "--json",
                                  "audit", "list", WORKER_SANDBOX], check=False, timeout=20)  # fmt: skip
    assert json.loads(batches.stdout)["batches"], batches
    assert wait_until(lambda: any(r.get("hostname") == "denied.test" for r in env.flows()), timeout=10)
    assert not env.log_events("flow")  # records are not console lines
    assert [tail.stop() for tail in (everything, denials, beta)] == [0, 0, 0]  # Ctrl-C ends it, exit 0


@pytest.mark.root
def test_dns_learned_addresses_reach_the_worker_that_serves_the_sandbox(env: EgressEnv) -> None:
    # Opaque TCP to 198.18.1.1:22 is allowed only once the sandbox's own DNS answer for allowed.test returned it;
    # the answer is given by the main process, the connection decided by worker 1.
    assert env.topo.python("sb2", BANNER_CLIENT, "198.18.1.1", "22").strip() == "RESET"
    assert_dns_answer_unlocks_opaque_tcp(env, "sb2")


@pytest.mark.root
def test_the_main_scrape_counts_the_workers_connections(env: EgressEnv) -> None:
    # A worker reports its counters once a second: an earlier test's connection to allowed.test may land in the
    # scrape after `before`, so this test counts a rule no other test's connections match.
    _, before = scrape(env)
    rule = {"protocol": "tls", "verdict": "allow", "rule": "allow_hosts later.test"}
    for _ in range(2):
        assert _fetch(env, "sb2", host="later.test", address="198.18.1.3").returncode == 0  # served by worker 1
    assert _fetch(env, "sb1", host="later.test", address="198.18.1.3").returncode == 0  # by the main process

    def counted() -> tuple[float, float] | None:
        _, after = scrape(env)
        moved = delta(before, after, "gateway_egress_connections_total", **rule)
        return (moved, delta(before, after, "gateway_egress_bytes_total", direction="down")) if moved >= 3 else None

    found = wait_until(counted, timeout=5, interval=0.2)
    assert found is not None and found[0] == 3 and found[1] > 0, found


@pytest.mark.root
def test_the_main_scrape_sums_the_workers_latency_histograms(env: EgressEnv) -> None:
    # Plain HTTP and failed dials: no other test here makes either, so a worker's late report of an earlier
    # test's connections cannot move these series.
    _, before = scrape(env)
    for sb in ("sb2", "sb1"):  # worker 1, then the main process
        ok = env.curl(sb, "http://later.test/", *pin("later.test", 80, "198.18.1.3"))
        assert ok.stdout.startswith("ORIGIN 198.18.1.3"), ok
        refused = env.curl(sb, "http://later.test:8080/", *pin("later.test", 8080, "198.18.1.3"))  # nothing listens
        assert refused.stdout.startswith("502") or "unreachable" in refused.stdout, refused

    def summed() -> tuple[float, ...] | None:
        _, after = scrape(env)
        got = tuple(
            delta(before, after, name, **labels)
            for name, labels in (
                ("gateway_egress_decision_seconds_count", {"protocol": "http", "verdict": "allow"}),
                ("gateway_egress_decision_seconds_bucket", {"protocol": "http", "verdict": "allow", "le": "+Inf"}),
                ("gateway_egress_decision_seconds_sum", {"protocol": "http", "verdict": "allow"}),
                ("gateway_egress_dial_seconds_count", {"outcome": "failed"}),
                ("gateway_egress_dial_seconds_bucket", {"outcome": "failed", "le": "+Inf"}),
                ("gateway_egress_dial_seconds_sum", {"outcome": "failed"}),
            )
        )
        return got if got[0] >= 4 and got[3] >= 2 else None

    found = wait_until(summed, timeout=5, interval=0.2)
    assert found is not None, "the worker's histograms did not reach the main scrape"
    decisions, decisions_inf, decided_seconds, dials, dials_inf, dial_seconds = found
    assert decisions == decisions_inf == 4 and 0 < decided_seconds < 40, found  # two allowed requests per process
    assert dials == dials_inf == 2 and 0 < dial_seconds < 6, found  # one refused dial per process


@pytest.mark.root
def test_sighup_reaches_the_workers_engines(env: EgressEnv) -> None:
    # A connection the worker relays (opaque TCP to the address sb2's own DNS answer returned) outlives the old
    # idle timeout (300 s) only until the worker takes the new one from the edited file.
    assert_dns_answer_unlocks_opaque_tcp(env, "sb2")
    holder = env.topo.start_python("sb2", SILENT_HOLDER, "198.18.1.1", ready="open", timeout=15)
    config = env.workdir / "gateway.toml"
    running = config.read_text()
    config.write_text(running.replace("[egress]\n", "[egress]\nidle_timeout = 1\n", 1))
    assert env.gateway is not None
    env.gateway.send_signal(signal.SIGHUP)
    try:
        assert wait_for_line(holder, "", 20).strip() == "RESET"
    finally:  # the later tests run under the running values again
        config.write_text(running)
        env.gateway.send_signal(signal.SIGHUP)


@pytest.mark.root
def test_sighup_puts_new_invariants_in_force_in_every_worker(env: EgressEnv) -> None:
    assert _fetch(env, "sb1").returncode == 0 and _fetch(env, "sb2").returncode == 0
    applied = lambda: env.log_events("policies.recompiled")  # noqa: E731
    before = len(applied())
    env.reload('[invariants]\nnever_reach = [{ name = "no-allowed", cidrs = ["198.18.1.1/32"], ports = [443] }]\n')
    assert wait_until(lambda: len(applied()) == before + 2, timeout=10)  # the main process and worker 1
    for sb, sandbox in (("sb1", MAIN_SANDBOX), ("sb2", WORKER_SANDBOX)):
        refused = _fetch(env, sb)
        assert refused.returncode != 0 and "alert access denied" in refused.stderr.lower(), refused.stderr

        def denied(sandbox: str = sandbox) -> bool:
            return any(f["sandbox"] == sandbox and f["rule"] == "invariant no-allowed" for f in env.flows())

        assert wait_until(denied, timeout=10), sandbox
    env.reload("")
    assert wait_until(lambda: len(applied()) == before + 4, timeout=10)
    assert _fetch(env, "sb1").returncode == 0 and _fetch(env, "sb2").returncode == 0


@pytest.mark.root
def test_a_dead_worker_fails_closed_and_is_restarted(env: EgressEnv) -> None:
    [worker] = env.worker_pids(1)
    os.kill(worker, signal.SIGKILL)
    # Dead (a zombie until the main process reaps it) means its listening socket is closed.
    assert wait_until(lambda: _dead(worker), timeout=5, interval=0.02)
    assert _fetch(env, "sb2", timeout=2).returncode != 0  # no listener: dropped, never forwarded
    assert _fetch(env, "sb1").returncode == 0  # the other worker's sandboxes are untouched

    def restarted() -> bool:
        pids = env.worker_pids(1)
        return bool(pids) and pids != [worker] and _fetch(env, "sb2", timeout=2).returncode == 0

    if not wait_until(restarted, timeout=20, interval=0.5):
        pytest.fail("worker 1 was not restarted")
    restarts = [e for e in env.log_events("worker.exited") if e.get("worker") == 1]
    assert restarts and restarts[-1]["code"] == -signal.SIGKILL


@pytest.mark.root
def test_workers_stop_with_the_main_process(env: EgressEnv) -> None:
    [worker] = env.worker_pids(1)
    assert env.gateway is not None
    logged = len(env.log_file.read_text(errors="replace"))
    env.stop_gateway()
    assert wait_until(lambda: not os.path.exists(f"/proc/{worker}"), timeout=10, interval=0.1)
    # The worker's stop is a clean one: its last records flushed to the main process, no traceback.
    assert "Traceback" not in env.log_file.read_text(errors="replace")[logged:]
    assert _fetch(env, "sb2", timeout=2).returncode != 0
