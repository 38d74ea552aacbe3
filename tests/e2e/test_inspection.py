"""The inspection tier through the product: `gateway run --data-plane --steer` with an `[inspection]` section, a
policy file marking one host, a real TLS origin in the internet namespace that echoes request headers, and curl
in the sandbox trusting the CA that `gateway certs ca` prints.

allowed.test (198.18.1.1) is marked: GET on /echo and /ok only, with the secret `api` injected as
`Authorization: Bearer <secret>`. later.test (198.18.1.3) is a plain allow_hosts entry: the fast path, untouched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.tier.supervisor import TIER_MODULE
from gateway.workers import worker_index
from tests import authdns
from tests.factory import (
    EGRESS_ZONE,
    NAMESPACE_API,
    REPO,
    EgressEnv,
    api,
    audit_batches,
    batch_records,
    pin,
    wait_until,
)
from tests.netns import INET_V4, Topology, live_namespaces, wait_for_line

pytestmark = pytest.mark.root

SECRET = "s3cr3t-token-for-the-origin-only"
SANDBOX_COPY = "Bearer sandbox-supplied-value"

#: An HTTPS origin on every origin address: answers with the request's headers (and echoes Authorization in a
#: response header too, as a careless API might), and appends each request's headers to a file.
ECHO_ORIGIN = r"""
import json, ssl, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
CTX = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
CTX.load_cert_chain(sys.argv[1], sys.argv[2])
SEEN = sys.argv[3]
class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        headers = [[k, v] for k, v in self.headers.items()]
        with open(SEEN, "a") as seen:
            seen.write(json.dumps({"path": self.path, "method": self.command, "headers": headers}) + "\n")
        body = json.dumps({"path": self.path, "headers": headers}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Echo-Authorization", self.headers.get("Authorization") or "")
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = answer
    def log_message(self, *args):
        pass
for address in sys.argv[4:]:
    server = ThreadingHTTPServer((address, 443), Echo)
    server.socket = CTX.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def inspected_policies() -> dict[str, Any]:
    return {
        "templates": {},
        "sandboxes": {
            "sb1": {
                "id": "sb1",
                "addresses": ["10.75.0.1", "fdd4:1476:6c7e::1"],
                "profile": "allowlisted",
                "egress": {
                    "allow_hosts": ["later.test"],
                    "inspect": [
                        {
                            "hosts": ["allowed.test", "denied.test"],
                            "methods": ["GET"],
                            "paths": ["/echo", "/ok"],
                            "deny_reason": "read-only access to allowed.test",
                            "credentials": [
                                {"header": "authorization", "secret": "api", "template": "Bearer {secret}"}
                            ],
                        }
                    ],
                },
            }
        },
    }


class InspectionEnv(EgressEnv):
    def __init__(self, topo: Topology, workdir: Path) -> None:
        super().__init__(topo, workdir)
        self.seen = workdir / "seen.ndjson"
        self.tier_ca = workdir / "inspection-ca.pem"
        self.environment = {
            "GATEWAY_INSPECTION__CA_DIR": str(workdir / "inspection"),
            "GATEWAY_INSPECTION__UPSTREAM_CA_FILE": str(self.ca),
            "GATEWAY_INSPECTION__SECRETS": '{ api = { env = "TEST_INSPECTION_SECRET" } }',
            # A pinning client's host: marked by the entry, kept opaque by the operator.
            "GATEWAY_INSPECTION__EXCLUDE_HOSTS": '["denied.test"]',
            "TEST_INSPECTION_SECRET": SECRET,
        }

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.environment, "PYTHONPATH": str(REPO)}
        argv = [sys.executable, "-m", "gateway.cli", *args, "--config", str(self.workdir / "gateway.toml")]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, check=False)

    def https(self, name: str, path: str, *extra: str, ca: Path | None = None) -> subprocess.CompletedProcess[str]:
        address = {"allowed.test": "198.18.1.1", "denied.test": "198.18.1.2", "later.test": "198.18.1.3"}[name]
        argv = ["curl", "-sS", "-i", "--connect-timeout", "3", "-m", "8", "--cacert", str(ca or self.tier_ca)]
        argv += [*pin(name, 443, address), *extra, f"https://{name}{path}"]
        return self.topo.run("sb1", argv, check=False, timeout=20)

    def origin_saw(self) -> list[dict[str, Any]]:
        if not self.seen.exists():
            return []
        return [json.loads(line) for line in self.seen.read_text().splitlines()]

    def tier_pid(self) -> int | None:
        assert self.gateway is not None  # its own child: another run's tier on this machine is not ours
        argv = ["pgrep", "-P", str(self.gateway.pid), "-f", TIER_MODULE]
        found = subprocess.run(argv, capture_output=True, text=True, check=False)
        pids = [int(p) for p in found.stdout.split()]
        return pids[0] if pids else None


def status_of(answer: subprocess.CompletedProcess[str]) -> int:
    """The status of curl -i's answer (HTTP/1.1 or HTTP/2), 0 when there was none."""
    first = answer.stdout.split("\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 and first[1].isdigit() else 0


@pytest.fixture(scope="module", name="env")
def inspection_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InspectionEnv]:
    with Topology(sandboxes=1, origins=3) as topo:
        e = InspectionEnv(topo, tmp_path_factory.mktemp("inspection"))
        topo.attach_with_cli()
        topo.start_python("inet", authdns.ZONE_SERVER_SCRIPT, str(INET_V4), json.dumps(EGRESS_ZONE))
        addresses = ["198.18.1.1", "198.18.1.2", "198.18.1.3"]
        origin = topo.popen(
            "inet", [sys.executable, "-u", "-c", ECHO_ORIGIN, str(e.cert), str(e.key), str(e.seen), *addresses]
        )
        wait_for_line(origin, "ready", 10)
        e.write_policies(inspected_policies())
        e.start_gateway()
        printed = e.cli("certs", "ca")
        assert printed.returncode == 0 and "BEGIN CERTIFICATE" in printed.stdout, printed.stderr
        e.tier_ca.write_text(printed.stdout)
        if not wait_until(lambda: status_of(e.https("allowed.test", "/ok")) == 200, 30):
            last = e.https("allowed.test", "/ok")
            raise AssertionError(last.stdout + last.stderr + e.log_file.read_text()[-3000:])
        yield e
    assert live_namespaces(topo.prefix) == []


def test_allowed_get_gets_the_credential_upstream_and_never_sees_it(env: InspectionEnv) -> None:
    before = len(env.origin_saw())
    answer = env.https("allowed.test", "/echo?q=1", "-H", f"Authorization: {SANDBOX_COPY}")
    assert status_of(answer) == 200, answer.stdout + answer.stderr
    assert SECRET not in answer.stdout  # neither the echoed body nor the echoing response header
    assert "[REDACTED]" in answer.stdout
    (seen,) = env.origin_saw()[before:]
    authorization = [v for k, v in seen["headers"] if k.lower() == "authorization"]
    assert authorization == [f"Bearer {SECRET}"]  # the sandbox's own copy was replaced, not added to


def test_a_method_or_path_the_entry_does_not_allow_is_refused_with_its_reason(env: InspectionEnv) -> None:
    before = len(env.origin_saw())
    post = env.https("allowed.test", "/echo", "-X", "POST", "-d", "x=1")
    assert status_of(post) == 403, post.stdout
    assert "read-only access to allowed.test" in post.stdout
    other = env.https("allowed.test", "/admin")
    assert status_of(other) == 403 and "read-only access to allowed.test" in other.stdout
    trace = env.https("allowed.test", "/echo", "-X", "TRACE")
    assert status_of(trace) == 403
    assert env.origin_saw()[before:] == []  # none of them reached the origin
    # Each refusal has its own denial id, which finds the request's record through the API (CLI).
    ids = [re.search(r"^X-Gateway-Denial-Id: (\S+)\r?$", answer.stdout, re.M | re.I) for answer in (post, other, trace)]
    assert all(ids) and len({found.group(1) for found in ids if found}) == 3, post.stdout
    first = ids[0].group(1) if ids[0] else ""
    lookup = [sys.executable, "-m", "gateway.cli", "--api", NAMESPACE_API, "--json", "audit", "denial", first]
    shown = lambda: env.topo.run("gw", lookup, check=False, timeout=20)  # noqa: E731
    assert wait_until(lambda: shown().returncode == 0, 10), shown().stderr
    record = json.loads(shown().stdout)
    assert (record["method"], record["path"], record["status"], record["verdict"], record["denial_id"]) == (
        "POST", "/echo", 403, "deny", first
    ), record  # fmt: skip


def test_a_host_header_naming_another_host_is_421(env: InspectionEnv) -> None:
    before = len(env.origin_saw())
    fronted = env.https("allowed.test", "/ok", "-H", "Host: later.test")
    assert status_of(fronted) == 421, fronted.stdout
    assert env.origin_saw()[before:] == []


def test_a_host_not_marked_stays_on_the_fast_path(env: InspectionEnv) -> None:
    # Only the origin's own CA is trusted: the fast path relays the origin's certificate untouched.
    answer = env.https("later.test", "/echo", "-H", f"Authorization: {SANDBOX_COPY}", ca=env.ca)
    assert status_of(answer) == 200, answer.stdout + answer.stderr
    seen = env.origin_saw()[-1]
    assert [v for k, v in seen["headers"] if k.lower() == "authorization"] == [SANDBOX_COPY]
    # And the inspection CA cannot stand in for it: nothing decrypts this host.
    assert status_of(env.https("later.test", "/echo")) == 0


def test_an_excluded_host_stays_opaque_and_still_checked_by_name(env: InspectionEnv) -> None:
    answer = env.https("denied.test", "/anything", "-X", "POST", "-H", f"Authorization: {SANDBOX_COPY}", ca=env.ca)
    assert status_of(answer) == 200, answer.stdout + answer.stderr  # the origin's own certificate: not decrypted
    seen = env.origin_saw()[-1]
    assert (seen["method"], seen["path"]) == ("POST", "/anything")  # no HTTP rules apply to what is not seen
    assert [v for k, v in seen["headers"] if k.lower() == "authorization"] == [SANDBOX_COPY]  # nor credentials
    # Still decided by name on the fast path: SNI naming a host no entry allows is refused at the same address.
    other = env.topo.run(
        "sb1",
        ["curl", "-sS", "-k", "--connect-timeout", "3", "-m", "8", *pin("nowhere.test", 443, "198.18.1.2"),
         "https://nowhere.test/"],
        check=False,
        timeout=15,
    )  # fmt: skip
    assert other.returncode != 0
    # explain says so too, through the operator's CLI and the running gateway's API.
    cli = [sys.executable, "-m", "gateway.cli", "--api", NAMESPACE_API, "--json", "explain", "sb1"]
    for host, inspected in (("denied.test", False), ("allowed.test", True)):
        shown = env.topo.run("gw", [*cli, host, "--method", "POST", "--path", "/x"], check=False, timeout=20)
        answer = json.loads(shown.stdout)
        assert answer["rule"] == f"inspect {host}"
        assert ("excluded from inspection" in answer["reason"]) is not inspected
        assert (answer["allowed"], answer["http"] is None) == (not inspected, not inspected), answer


def test_records_name_each_inspected_request_and_hold_no_secret(env: InspectionEnv) -> None:
    env.https("allowed.test", "/ok?token=abc")
    audit = env.workdir / "audit"

    def inspected() -> list[dict[str, Any]]:
        return [r for batch in audit_batches(audit) for r in batch_records(batch) if r.get("method")]

    assert wait_until(lambda: any(r["path"] == "/ok" for r in inspected()), 10)
    records = inspected()
    assert {(r["method"], r["path"], r["verdict"]) for r in records} >= {
        ("GET", "/ok", "allow"),
        ("POST", "/echo", "deny"),
    }
    for path in [*audit_batches(audit), env.log_file]:
        text = path.read_text(errors="replace")
        assert SECRET not in text and "token=abc" not in text, path
    # Each request was decided with the entry of the policy its connection was handed over with: sb1's, as the API
    # names it (the policy file has not changed since).
    status, shown = api(env, "GET", "/v1/sandboxes/sb1")
    assert status == 200 and {r["revision"] for r in records} == {shown["revision"]}, records
    # A new revision (a label changes the record): the next connection's requests name it.
    status, changed = api(env, "PATCH", "/v1/sandboxes/sb1", {"labels": {"step": "two"}})
    assert status == 200 and changed["revision"] != shown["revision"], changed
    assert status_of(env.https("allowed.test", "/ok?second")) == 200

    def second() -> list[dict[str, Any]]:
        return [r for r in inspected() if r["path"] == "/ok" and r["revision"] == changed["revision"]]

    assert wait_until(second, 10), inspected()


def test_with_the_tier_down_marked_hosts_fail_closed_and_others_pass_then_it_is_back(env: InspectionEnv) -> None:
    pid = env.tier_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # hung: it accepts connections (the kernel does) and answers nothing
    try:
        before = len(env.origin_saw())
        # The hand-over waits up to [egress] connect_timeout (3 s here) for the tier's answer; curl waits longer.
        refused = env.https("allowed.test", "/ok", "--connect-timeout", "8", "-m", "12")
        assert status_of(refused) == 0 and "alert" in refused.stderr, refused.stdout + refused.stderr
        assert status_of(env.https("later.test", "/ok", ca=env.ca)) == 200  # the fast path is unaffected
        assert len(env.origin_saw()) == before + 1  # only later.test's request reached an origin
    finally:
        os.kill(pid, signal.SIGKILL)  # dead: the supervisor starts another
    assert wait_until(lambda: env.tier_pid() not in (None, pid), 20)
    assert wait_until(lambda: status_of(env.https("allowed.test", "/ok")) == 200, 30)
    assert status_of(env.https("allowed.test", "/echo", "-X", "POST")) == 403


def test_a_worker_process_hands_marked_hosts_to_the_main_process_tier(env: InspectionEnv) -> None:
    """Last in the module: it restarts the gateway with `--workers 3`, where sb1 is served by worker 1."""
    env.stop_gateway()
    env.start_gateway("--workers", "3")
    assert wait_until(lambda: status_of(env.https("allowed.test", "/ok")) == 200, 30)
    before = len(env.origin_saw())
    answer = env.https("allowed.test", "/echo")
    assert status_of(answer) == 200 and SECRET not in answer.stdout
    (seen,) = env.origin_saw()[before:]
    assert [v for k, v in seen["headers"] if k.lower() == "authorization"] == [f"Bearer {SECRET}"]
    assert status_of(env.https("allowed.test", "/echo", "-X", "POST")) == 403
    # It was worker 1 that handed those over: while that process is stopped, sb1's marked host gets no answer at all,
    # although the main process and its tier run on. (Every process's flow records reach the main process's flow
    # log, so the batches cannot tell which process decided.)
    assert worker_index("sb1", 3) == 1
    [worker] = env.worker_pids(1)
    os.kill(worker, signal.SIGSTOP)
    try:
        stalled = env.https("allowed.test", "/ok", "-m", "3")
        assert status_of(stalled) == 0, stalled.stdout
    finally:
        os.kill(worker, signal.SIGCONT)
    assert wait_until(lambda: status_of(env.https("allowed.test", "/ok")) == 200, 30)
