"""examples/ run against the product: every policy and template is accepted by a real `gateway run`, the
Redis writer's sandbox is served by `gateway run` on a real redis-server, and the platform snippet drives
a real `gateway run` (its tunnel service on) from create to delete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.factory import ADMIN_TOKEN, REPO, Server, clean_env, free_port, gateway, start_server, wait_until
from tests.redis_server import RedisServer

EXAMPLES = REPO / "examples"
POLICIES = sorted((EXAMPLES / "policies").glob("*.json"))
TEMPLATES = sorted((EXAMPLES / "templates").glob("*.json"))


def test_there_is_a_policy_per_profile() -> None:
    profiles = {json.loads(path.read_text())["profile"] for path in POLICIES}
    assert profiles == {"isolated", "registry", "allowlisted", "unrestricted"}
    assert TEMPLATES


def test_every_example_policy_and_template_is_accepted(server: Server) -> None:
    for path in TEMPLATES:
        done = gateway("template", "create", "--file", str(path), server=server)
        assert done.returncode == 0, f"{path.name}: {done.stderr}"
    for path in POLICIES:
        done = gateway("sandbox", "create", "--file", str(path), server=server)
        assert done.returncode == 0, f"{path.name}: {done.stderr}"
    listed = gateway("--json", "sandbox", "list", server=server)
    ids = {record["id"] for record in json.loads(listed.stdout)["sandboxes"]}
    assert ids == {json.loads(path.read_text())["id"] for path in POLICIES}


def run_example(name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(**env),
        check=False,
    )


def test_redis_writer_sandbox_is_served_by_the_gateway(tmp_path: Path, redis_server: RedisServer) -> None:
    running = start_server(tmp_path, GATEWAY_STORE__BACKEND="redis", GATEWAY_STORE__REDIS_URL=redis_server.url)
    try:
        policy = EXAMPLES / "policies" / "ai-agent.json"
        done = run_example("redis_writer.py", "--redis-url", redis_server.url, str(policy))
        assert done.returncode == 0, done.stderr

        def listed() -> set[str]:
            answer = gateway("--json", "sandbox", "list", server=running)
            return {record["id"] for record in json.loads(answer.stdout)["sandboxes"]}

        assert wait_until(lambda: listed() == {"agent-42"}, timeout=10)
        verdict = gateway("explain", "agent-42", "api.openai.com:443", server=running)
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr
        done = run_example("redis_writer.py", "--redis-url", redis_server.url, "--delete", "agent-42")
        assert done.returncode == 0, done.stderr
        assert wait_until(lambda: listed() == set(), timeout=10)
    finally:
        running.stop()


def test_platform_client_snippet_against_gateway_run(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init = gateway("certs", "init", "--dir", str(certs), token=None)
    assert init.returncode == 0, init.stderr
    running = start_server(
        tmp_path,
        GATEWAY_TUNNEL__ENABLED="true",
        GATEWAY_TUNNEL__PORT=str(free_port()),
        GATEWAY_TUNNEL__CERT_PATH=str(certs / "tunnel.crt"),
        GATEWAY_TUNNEL__KEY_PATH=str(certs / "tunnel.key"),
        GATEWAY_TUNNEL__CA_CERT_PATH=str(certs / "ca.crt"),
        GATEWAY_TUNNEL__CA_KEY_PATH=str(certs / "ca.key"),
    )
    try:
        done = run_example("platform_client.py", GATEWAY_API_URL=running.url, GATEWAY_TOKEN=ADMIN_TOKEN)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "created agent-42 (allowlisted)"
        assert lines[1].startswith("explain api.example.com:443: ALLOW")
        assert lines[2].startswith("explain evil.example.net:443: DENY")
        assert lines[3].startswith("tunnel ") and " at https://" in lines[3]
        assert lines[4].startswith("revoked ") and lines[-1] == "deleted agent-42"
        assert json.loads(gateway("--json", "sandbox", "list", server=running).stdout)["sandboxes"] == []
    finally:
        running.stop()
