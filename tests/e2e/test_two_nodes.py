"""Two gateway nodes on separate hosts sharing one Redis (issue 13, "Lifecycle"): what one node is told through
its API reaches the other within a second: a policy change, a deletion, a tunnel and its revocation.

Hosts are namespaces on one bridge (tests.netns.Lan): `redis` (the redis-server), `a` and `b` (each a
`gateway run --config`, API and tunnel on its own address), `app` (the sandbox's HTTP app) and the hub itself,
where the tunnel's client (curl, real TLS against the CA `gateway certs init` made) runs. The test drives node
A's API and watches node B's, each from a thread inside that node's namespace.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.factory import ADMIN_TOKEN, Answer, clean_env, wait_until
from tests.netns import Lan, in_namespace, live_namespaces, wait_for_line
from tests.product import ProductApi
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "nodes.test"
API_PORT, TUNNEL_PORT, APP_PORT = 8470, 8443, 3000
APP = "10.75.9.80"  # the sandbox's address (inside the sandbox subnets), routed to the app host by both nodes
PROPAGATION = 1.0  # seconds, the bound for a change on one node to show on the other

#: The sandbox's app, on APP: answers every GET with its path (argv: address, port).
APP_SERVER = r"""
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("app saw " + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
print("ready", flush=True)
server.serve_forever()
"""


@dataclass
class Node:
    name: str
    address: str
    api: ProductApi
    thread: ThreadPoolExecutor  # inside the node's namespace: its API is on the node's own address

    def call(self, method: str, path: str, body: Any = None, *, expect: int | None = None) -> Answer:
        return self.thread.submit(lambda: self.api.call(method, path, body, expect=expect)).result()

    def ready(self) -> bool:
        try:
            return self.call("GET", "/readyz").status == 200
        except urllib.error.URLError:  # not listening yet
            return False


@dataclass
class Cluster:
    lan: Lan
    nodes: dict[str, Node]
    ca: Path

    def curl(self, node: str, tunnel: dict[str, Any]) -> tuple[int, str]:
        """(status, body) of a GET of the tunnel's URL through `node`, from the hub, verifying the tunnel CA."""
        host = f"{tunnel['id']}.{DOMAIN}"
        argv = ["curl", "-sS", "--max-time", "5", "--cacert", str(self.ca), "-w", "\n%{http_code}"]
        argv += ["--resolve", f"{host}:{TUNNEL_PORT}:{self.nodes[node].address}", f"https://{host}:{TUNNEL_PORT}/x"]
        out = self.lan.run("hub", argv, check=False, timeout=10)
        assert out.returncode == 0, out.stderr
        body, _, status = out.stdout.rpartition("\n")
        return int(status), body


def config(workdir: Path, node: str, address: str, redis_url: str) -> Path:
    certs = workdir / "certs"  # one certificate for both nodes, as behind one wildcard DNS name
    path = workdir / f"gateway-{node}.toml"
    lines = [
        "[store]",
        'backend = "redis"',
        f'redis_url = "{redis_url}"',
        f'node_id = "{node}"',
        "[api]",
        f'host = "{address}"',
        f"port = {API_PORT}",
        f'tokens = [{{ name = "ops", token = "{ADMIN_TOKEN}", scopes = ["admin"] }}]',
        "[log]",
        'format = "json"',
        "[audit]",
        f'dir = "{workdir / f"audit-{node}"}"',
        "[tunnel]",
        "enabled = true",
        f'domain = "{DOMAIN}"',
        f'host = "{address}"',
        f"port = {TUNNEL_PORT}",
        f'cert_path = "{certs / "tunnel.crt"}"',
        f'key_path = "{certs / "tunnel.key"}"',
        f'ca_cert_path = "{certs / "ca.crt"}"',
        f'ca_key_path = "{certs / "ca.key"}"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        env=clean_env(PYTHONPATH=str(REPO)),
        cwd=str(REPO),
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("two-nodes")
    threads: list[ThreadPoolExecutor] = []
    with Lan(["redis", "a", "b", "app"]) as lan:
        redis = RedisServer(workdir / "redis", netns=f"{lan.prefix}-redis", host=str(lan.addresses["redis"]))
        try:
            redis.start()
            configs = {n: config(workdir, n, str(lan.addresses[n]), redis.url) for n in ("a", "b")}
            made = gateway("certs", "init", "--config", str(configs["a"]))
            assert made.returncode == 0, made.stdout + made.stderr
            lan.run("app", ["ip", "addr", "add", f"{APP}/32", "dev", "eth0"])
            for name in ("a", "b"):
                lan.run(name, ["ip", "route", "add", APP, "via", str(lan.addresses["app"])])
            lan.start_python("app", APP_SERVER, APP, str(APP_PORT))
            nodes = {}
            for name, path in configs.items():
                log = (workdir / f"gateway-{name}.log").open("a")
                argv = [sys.executable, "-m", "gateway.cli", "run", "--config", str(path)]
                proc = lan.popen(name, argv, stderr=log, env=clean_env(PYTHONPATH=str(REPO)), cwd=str(REPO))
                log.close()
                wait_for_line(proc, "tunnels served on", 30)
                address = str(lan.addresses[name])
                thread = in_namespace(f"{lan.prefix}-{name}")
                threads.append(thread)
                node = Node(name, address, ProductApi(f"http://{address}:{API_PORT}"), thread)
                assert wait_until(node.ready, 20), f"node {name} never became ready"
                nodes[name] = node
            nodes["a"].thread.submit(nodes["a"].api.check_served_document).result()
            yield Cluster(lan, nodes, workdir / "certs" / "ca.crt")
        finally:
            for thread in threads:
                thread.shutdown()
            redis.stop()
    assert live_namespaces(lan.prefix) == [], "namespaces left behind"


def within(predicate: Callable[[], Any], since: float) -> bool:
    """Whether `predicate` holds within PROPAGATION seconds of `since` (a write's answer)."""
    return bool(wait_until(predicate, max(0.0, since + PROPAGATION - time.monotonic()), interval=0.02))


def allowed(node: Node, sandbox: str, host: str) -> bool | None:
    answer = node.call("GET", f"/v1/sandboxes/{sandbox}/explain?host={host}")
    return bool(answer.body["allowed"]) if answer.status == 200 else None


@pytest.mark.root
def test_a_policy_change_and_a_deletion_on_one_node_reach_the_other_within_a_second(cluster: Cluster) -> None:
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    record = {"id": "shared", "addresses": ["10.75.9.1"], "profile": "allowlisted"}
    a.call("POST", "/v1/sandboxes", {**record, "egress": {"allow_hosts": ["one.example.com"]}}, expect=201)
    written = time.monotonic()
    assert within(lambda: allowed(b, "shared", "one.example.com:443") is True, written), "B never saw it"
    assert allowed(b, "shared", "two.example.com:443") is False

    first = a.call("GET", "/v1/sandboxes/shared", expect=200).body["revision"]
    a.call("PUT", "/v1/sandboxes/shared", {**record, "egress": {"allow_hosts": ["two.example.com"]}}, expect=200)
    written = time.monotonic()
    assert within(lambda: allowed(b, "shared", "two.example.com:443") is True, written), "B kept the old policy"
    assert allowed(b, "shared", "one.example.com:443") is False

    # The revision history is shared: B lists A's writes (same ids: content ids) and restores the previous one.
    second = b.call("GET", "/v1/sandboxes/shared", expect=200).body["revision"]
    listed = b.call("GET", "/v1/sandboxes/shared/revisions", expect=200).body["revisions"]
    assert [(r["revision"], r["source"]) for r in listed] == [(second, "api"), (first, "api")]
    restored = b.call("POST", "/v1/sandboxes/shared/restore", {}, expect=200)
    assert restored.headers["X-Gateway-Revision"] == first
    written = time.monotonic()
    assert within(lambda: allowed(a, "shared", "one.example.com:443") is True, written), "A kept the narrowed policy"
    assert [r["revision"] for r in a.call("GET", "/v1/sandboxes/shared/revisions").body["revisions"]] == [first, second]

    a.call("DELETE", "/v1/sandboxes/shared", expect=204)
    written = time.monotonic()
    assert within(lambda: b.call("GET", "/v1/sandboxes/shared").status == 404, written), "B kept the sandbox"


@pytest.mark.root
def test_a_tunnel_exposed_on_one_node_serves_on_the_other_and_its_revocation_reaches_it_within_a_second(
    cluster: Cluster,
) -> None:
    a = cluster.nodes["a"]
    a.call("POST", "/v1/sandboxes", {"id": "web", "addresses": [APP], "ingress": {"public_access": True}}, expect=201)
    tunnel = a.call("POST", "/v1/sandboxes/web/tunnels", {"port": APP_PORT}, expect=201).body
    written = time.monotonic()
    assert within(lambda: cluster.curl("b", tunnel) == (200, "app saw /x"), written), cluster.curl("b", tunnel)

    assert a.call("DELETE", f"/v1/tunnels/{tunnel['id']}", expect=200).body["state"] == "revoked"
    written = time.monotonic()
    assert within(lambda: cluster.curl("b", tunnel)[0] == 410, written), cluster.curl("b", tunnel)
    assert cluster.curl("a", tunnel)[0] == 410
    a.call("DELETE", "/v1/sandboxes/web", expect=204)
