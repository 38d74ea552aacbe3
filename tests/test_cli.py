"""The `gateway` command end to end: a real `gateway run` subprocess, driven by the CLI as subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.factory import (
    ADMIN_TOKEN,
    LIMITED_TOKEN,
    Server,
    clean_env,
    free_port,
    gateway,
    start_server,
    wait_until,
    write_config,
)
from tests.redis_server import RedisServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    instance = start_server(tmp_path_factory.mktemp("gateway-run"))
    try:
        yield instance
    finally:
        instance.stop()


# --------------------------------------------------------------------------- run / check-config


def verdict_line(explained: str) -> str:
    """What `gateway explain` prints before its precedence chain."""
    return explained.split("  precedence chain:\n")[0]


def test_run_on_redis_serves_api_writes_and_applies_writes_of_other_services(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    server = start_server(tmp_path, GATEWAY_STORE__BACKEND="redis", GATEWAY_STORE__REDIS_URL=redis_server.url)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        created = gateway(
            "sandbox", "create", "--id", "r1", "--address", "10.75.0.21", "--profile", "registry", server=server
        )
        assert created.returncode == 0, created.stderr
        assert json.loads(client.hget("gw:sandboxes", "r1"))["profile"] == "registry"

        record = {
            "id": "r2",
            "addresses": ["10.75.0.22"],
            "profile": "allowlisted",
            "egress": {"allow_hosts": ["api.example.com"]},
        }
        with client.pipeline(transaction=True) as tx:  # the README's contract, as another service writes it
            tx.hset("gw:sandboxes", "r2", json.dumps(record))
            tx.xadd("gw:changes", {"kind": "sandbox", "key": "r2", "op": "put", "source": "test"})
            tx.execute()

        def explained() -> subprocess.CompletedProcess[str]:
            return gateway("--json", "explain", "r2", "api.example.com", server=server)

        def allowed() -> bool:
            answer = explained()
            return answer.returncode == 0 and json.loads(answer.stdout)["allowed"] is True

        assert wait_until(allowed, 2), explained()  # its repr shows stdout and stderr
        status = json.loads(gateway("--json", "status", server=server).stdout)
        assert (status["backend"], status["sandboxes"]) == ("redis", 2)
    finally:
        client.close()
        server.stop()


def test_run_says_where_it_listens_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        line = server.stdout.read_text().strip()
        assert line == f"gateway API listening on {server.url}, store embedded {tmp_path / 'policies.json'}"
    finally:
        assert server.stop() == 0
    logs = [json.loads(entry) for entry in server.stderr.read_text().splitlines() if entry.startswith("{")]
    assert any(entry["event"] == "gateway.stopping" for entry in logs)
    assert ADMIN_TOKEN not in server.stderr.read_text()


def test_run_with_an_invalid_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[api]\nport = "eighty"\n')
    result = gateway("run", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.startswith("CONFIG_INVALID: ") and "(field api.port)" in result.stderr


def test_run_workers_need_the_data_plane_and_ports_that_fit(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    result = gateway("run", "--config", str(config), "--workers", "2")
    assert result.returncode == 2 and "--workers is for the egress engine: it needs --data-plane" in result.stderr
    result = gateway("run", "--config", str(config), "--data-plane", "--workers", "60")
    assert result.returncode == 2
    assert "--workers 60: the DNS port 15053 is inside the egress ports 15001-15060" in result.stderr


def test_run_refuses_an_exposed_api_without_tokens(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port(), tokens=False, host="0.0.0.0")
    result = gateway("run", "--config", str(config))
    assert result.returncode == 2
    assert "CONFIG_INVALID" in result.stderr and "(field api.tokens)" in result.stderr


def test_check_config_summarises_a_good_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, 18999)
    result = gateway("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"store:           embedded {tmp_path / 'policies.json'}" in out
    assert "api:             http://127.0.0.1:18999" in out
    assert "sandbox subnets: 10.75.0.0/16, fdd4:1476:6c7e::/48" in out
    assert "  ops  admin" in out and "  ci   sandboxes:read, sandboxes:write" in out
    assert "internal" in out and "configured" in out and "package-registries" in out
    assert ADMIN_TOKEN not in out and LIMITED_TOKEN not in out
    assert out.rstrip().endswith("configuration is valid")


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("[api]\ncolour = 1\n", "api.colour"),
        ('[network]\nsandbox_subnets = ["10.75.0.1/16"]\n', "network.sandbox_subnets[0]"),
        ('[store]\nbackend = "etcd"\n', "store.backend"),
        ("[api\n", None),
    ],
)
def test_check_config_reports_errors_with_exit_2(tmp_path: Path, content: str, field: str | None) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(content)
    result = gateway("check-config", "--config", str(config))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("CONFIG_INVALID: ")
    if field:  # unknown options are located in the file: (field /path/gateway.toml:api.colour)
        assert result.stderr.rstrip().endswith(f"{field})") and "(field " in result.stderr


def test_check_config_lists_a_tokens_sandboxes_and_refuses_a_gateway_wide_scope_on_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, 18999)
    ci = 'scopes = ["sandboxes:read", "sandboxes:write"] }'
    config.write_text(config.read_text().replace(ci, ci[:-1] + ', sandboxes = ["tenant-a-*", "ci-42"] }'))
    result = gateway("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "  ci   sandboxes:read, sandboxes:write  sandboxes: tenant-a-*, ci-42" in result.stdout
    config.write_text(config.read_text().replace('"sandboxes:write"]', '"sandboxes:write", "templates:write"]'))
    refused = gateway("check-config", "--config", str(config))
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr.startswith("CONFIG_INVALID: a token limited to some sandboxes cannot hold templates:write")
    assert "(field " in refused.stderr and "api.tokens[1].scopes)" in refused.stderr


def test_check_config_without_tokens_on_loopback_warns_but_passes(tmp_path: Path) -> None:
    result = gateway("check-config", "--config", str(write_config(tmp_path, 18998, tokens=False)))
    assert result.returncode == 0
    assert "tokens:          none" in result.stdout


# --------------------------------------------------------------------------- client commands


def test_sandbox_lifecycle_through_the_cli(server: Server, tmp_path: Path) -> None:
    created = gateway(
        "sandbox", "create", "--id", "cli-agent", "--address", "10.75.1.1", "--profile", "allowlisted",
        "--allow-host", "api.github.com,*.example.com", "--preset", "ai-apis", "--label", "team=research",
        server=server,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created sandbox cli-agent\n")
    assert "egress.allow_hosts:    api.github.com, *.example.com" in created.stdout

    listed = gateway("sandbox", "list", server=server)
    assert listed.returncode == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "PROFILE", "TEMPLATE", "ADDRESSES", "EGRESS"]
    row = next(r for r in rows if r.startswith("cli-agent "))
    assert row.split()[:4] == ["cli-agent", "allowlisted", "-", "10.75.1.1"]
    assert header.index("PROFILE") == row.index("allowlisted")  # columns line up

    got = gateway("sandbox", "get", "cli-agent", "--json", server=server)
    assert got.returncode == 0
    record = json.loads(got.stdout)
    assert record["egress"] == {"allow_hosts": ["api.github.com", "*.example.com"], "presets": ["ai-apis"]}
    assert record["labels"] == {"team": "research"}
    # Global flags work before the subcommand too.
    assert json.loads(gateway("--json", "sandbox", "get", "cli-agent", server=server).stdout) == record

    allow = gateway("explain", "cli-agent", "api.github.com", server=server)
    assert allow.returncode == 0
    assert allow.stdout == (
        "ALLOW  api.github.com:443  host api.github.com allowed by allow_hosts api.github.com  "
        "(rule allow_hosts api.github.com)\n"
        "  precedence chain:\n"
        "    1. builtin:smtp: not an SMTP port\n"
        "    2. invariant: no [invariants] assertion forbids it\n"
        "    3. egress.allow_internet: egress allowed\n"
        "    4. egress.mode:allow_all: not in force (profile allowlisted): only what the policy lists is allowed\n"
        "    5. => allow_hosts api.github.com: host api.github.com allowed by allow_hosts api.github.com\n"
    )
    deny = gateway("explain", "cli-agent", "evil.com", server=server)
    assert verdict_line(deny.stdout) == "DENY  evil.com:443  host not in allowlist  (rule default:deny)\n"
    assert "6. => default:deny: host not in allowlist" in deny.stdout, deny.stdout
    assert deny.returncode == 4  # a verdict, not a failure: its own exit code
    preset = gateway("explain", "cli-agent", "api.openai.com:8443", server=server)
    assert preset.stdout.startswith("DENY  api.openai.com:8443  port 8443 not allowed")
    http = gateway("explain", "cli-agent", "docs.example.com", "--protocol", "http", "--json", server=server)
    assert json.loads(http.stdout)["request"] == {
        "host": "docs.example.com", "address": None, "port": 80, "protocol": "http", "method": None, "path": None,
    }  # fmt: skip

    patch_file = tmp_path / "patch.json"
    patch_file.write_text(json.dumps({"labels": {"team": None, "owner": "ana"}, "egress": {"presets": None}}))
    patched = gateway("sandbox", "patch", "cli-agent", "--file", str(patch_file), "--json", server=server)
    assert patched.returncode == 0, patched.stderr
    assert json.loads(patched.stdout)["labels"] == {"owner": "ana"}
    assert json.loads(patched.stdout)["egress"] == {"allow_hosts": ["api.github.com", "*.example.com"]}
    from_stdin = gateway("sandbox", "patch", "cli-agent", "--file", "-", stdin='{"labels": {"x": "y"}}', server=server)
    assert from_stdin.returncode == 0 and "labels:                owner=ana, x=y" in from_stdin.stdout

    replaced = gateway(
        "sandbox", "update", "cli-agent", "--data", '{"addresses": ["10.75.1.2"], "profile": "allowlisted"}',
        "--json", server=server,
    )  # fmt: skip
    assert replaced.returncode == 0 and json.loads(replaced.stdout)["egress"] == {}

    deleted = gateway("sandbox", "delete", "cli-agent", server=server)
    assert (deleted.returncode, deleted.stdout) == (0, "deleted sandbox cli-agent\n")
    gone = gateway("sandbox", "get", "cli-agent", server=server)
    assert gone.returncode == 1
    assert gone.stderr == "SANDBOX_NOT_FOUND: no sandbox 'cli-agent' (field id)\n"


def test_policy_revisions_and_restore_through_the_cli(server: Server) -> None:
    created = gateway(
        "sandbox", "create", "--id", "cli-rev", "--address", "10.75.1.30", "--profile", "allowlisted",
        "--allow-host", "api.github.com", "--json", server=server,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    first = json.loads(created.stdout)["revision"]
    narrowed = gateway("sandbox", "patch", "cli-rev", "--data", '{"egress": {"allow_hosts": ["pypi.org"]}}',
                       "--json", server=server)  # fmt: skip
    second = json.loads(narrowed.stdout)["revision"]

    listed = gateway("policy", "revisions", "cli-rev", server=server)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["REVISION", "ACCEPTED", "SOURCE", "TEMPLATE", "EGRESS"]
    assert rows[0].split()[:2] == ["*", second] and rows[1].split()[0] == first
    assert " api " in rows[1] and "1 host" in rows[1]

    restored = gateway("policy", "restore", "cli-rev", server=server)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith(f"restored sandbox cli-rev to {first}: revision {first} in force\n")
    by_id = gateway("policy", "restore", "cli-rev", "--revision", second, "--json", server=server)
    assert json.loads(by_id.stdout)["revision"] == second
    unknown = gateway("policy", "restore", "cli-rev", "--revision", "r000000000000", server=server)
    assert unknown.returncode == 1 and unknown.stderr.startswith("REVISION_NOT_FOUND: ")
    assert gateway("sandbox", "delete", "cli-rev", server=server).returncode == 0


def test_allow_cidr_implies_deny_all(server: Server) -> None:
    created = gateway(
        "sandbox", "create", "--id", "cli-cidr", "--address", "10.75.1.10", "--profile", "allowlisted",
        "--allow-cidr", "1.1.1.1/32", "--allow-cidr", "1.0.0.1/32", "--allow-port", "443", "--json", server=server,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["egress"] == {
        "mode": "deny_all", "allow_cidrs": ["1.1.1.1/32", "1.0.0.1/32"], "allow_ports": [443],
    }  # fmt: skip
    ok = gateway("explain", "cli-cidr", "1.1.1.1:443", server=server)
    assert verdict_line(ok.stdout) == (
        "ALLOW  1.1.1.1:443  address in allow_cidrs 1.1.1.1/32  (rule allow_cidrs 1.1.1.1/32)\n"
    )
    port = gateway("explain", "cli-cidr", "--address", "1.1.1.1", "--port", "22", "--protocol", "tcp", server=server)
    assert port.stdout.startswith("DENY  1.1.1.1:22/tcp  port 22 not in allow_ports")


def test_api_errors_print_the_code_and_exit_1(server: Server) -> None:
    bad = gateway(
        "sandbox", "create", "--id", "cli-bad", "--address", "10.75.1.20", "--profile", "allowlisted",
        "--allow-host", "https://example.com", server=server,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.startswith("INVALID_HOSTNAME: ") and bad.stderr.endswith("(field egress.allow_hosts[0])\n")

    as_json = gateway("sandbox", "get", "nobody", "--json", server=server)
    assert as_json.returncode == 1 and as_json.stdout == ""
    assert json.loads(as_json.stderr) == {"code": "SANDBOX_NOT_FOUND", "message": "no sandbox 'nobody'", "field": "id"}

    denied = gateway(
        "sandbox", "create", "--id", "cli-wide", "--address", "10.75.1.21", "--profile", "unrestricted",
        server=server, token=LIMITED_TOKEN,
    )  # fmt: skip
    assert denied.returncode == 1 and denied.stderr.startswith("NETWORK_PROFILE_DENIED: ")
    assert gateway("sandbox", "get", "cli-wide", server=server).returncode == 1  # nothing was written

    unauthenticated = gateway("status", server=server, token="wrong-token-0123456789")
    assert unauthenticated.returncode == 1 and unauthenticated.stderr.startswith("UNAUTHENTICATED: unknown token")
    no_token = gateway("presets", server=server, token=None)
    assert no_token.returncode == 1 and no_token.stderr.startswith("UNAUTHENTICATED: ")
    explained = gateway("explain", "nobody", "a.com", server=server)
    assert (explained.returncode, explained.stderr) == (1, "SANDBOX_NOT_FOUND: no sandbox 'nobody' (field id)\n")
    bad_port = gateway("explain", "nobody", "a.com:99999", server=server)
    assert bad_port.returncode == 1


def test_templates_through_the_cli(server: Server, tmp_path: Path) -> None:
    created = gateway(
        "template", "create", "--name", "cli-base", "--description", "git and AI", "--preset", "git-hosts",
        server=server,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    listed = gateway("template", "list", server=server)
    assert any(line.split()[:3] == ["cli-base", "1", "preset"] for line in listed.stdout.splitlines())
    assert "git and AI" in listed.stdout

    user = gateway(
        "sandbox", "create", "--id", "cli-user", "--address", "10.75.1.30", "--profile", "allowlisted",
        "--template", "cli-base", server=server,
    )  # fmt: skip
    assert user.returncode == 0, user.stderr
    assert gateway("explain", "cli-user", "github.com:22", server=server).stdout.startswith("ALLOW  github.com:22")

    record = tmp_path / "template.json"
    record.write_text(json.dumps({"description": "AI only", "egress": {"presets": ["ai-apis"]}}))
    updated = gateway("template", "update", "cli-base", "--file", str(record), server=server)
    assert updated.returncode == 0 and "egress.presets: ai-apis" in updated.stdout
    assert gateway("explain", "cli-user", "github.com:22", server=server).stdout.startswith("DENY  github.com:22")

    in_use = gateway("template", "delete", "cli-base", server=server)
    assert in_use.returncode == 1 and in_use.stderr.startswith("TEMPLATE_IN_USE: ")
    assert gateway("sandbox", "delete", "cli-user", server=server).returncode == 0
    assert gateway("template", "delete", "cli-base", server=server).returncode == 0
    assert gateway("template", "get", "cli-base", server=server).stderr.startswith("TEMPLATE_NOT_FOUND: ")


def test_status_and_presets(server: Server) -> None:
    status = gateway("status", server=server)
    assert status.returncode == 0
    assert "backend:   embedded" in status.stdout and "auth:      tokens" in status.stdout
    presets = gateway("presets", server=server)
    header, *rows = presets.stdout.splitlines()
    assert header.split() == ["NAME", "PORTS", "HOSTS", "DESCRIPTION"]
    assert any(row.split()[:3] == ["internal", "443", "1"] for row in rows)
    raw = json.loads(gateway("presets", "--json", server=server).stdout)
    assert {p["name"] for p in raw["presets"]} >= {"git-hosts", "internal"}


def test_the_api_address_comes_from_the_config_file(server: Server) -> None:
    # No --api and no GATEWAY_API_URL: the client reads [api] host/port from the same config file.
    result = gateway("status", "--config", str(server.config))
    assert result.returncode == 0, result.stderr


def test_console_script_runs(server: Server) -> None:
    script = Path(sys.executable).with_name("gateway")
    if not script.exists():
        pytest.skip("the console script is not installed in this environment")
    result = subprocess.run(
        [str(script), "--api", server.url, "--token", ADMIN_TOKEN, "sandbox", "list", "--json"],
        capture_output=True, text=True, timeout=30, env=clean_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0 and "sandboxes" in json.loads(result.stdout)


def test_unreachable_api_exits_3() -> None:
    result = gateway("sandbox", "list", GATEWAY_API_URL=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert result.stderr.startswith("UNREACHABLE: cannot reach the gateway API at http://127.0.0.1:")
    assert "connection refused" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sandbox", "create", "--address", "10.75.1.40"], "needs --id and --address"),
        (["sandbox", "create", "--data", "{}", "--id", "x"], "not both (--id)"),
        (["sandbox", "patch", "x"], "give the record with --file"),
        (["sandbox", "patch", "x", "--data", "{nope"], "INVALID_JSON: --data: not valid JSON"),
        (["sandbox", "patch", "x", "--data", '{"n": ' + "1" * 5000 + "}"], "INVALID_JSON: --data: holds an integer"),
        (["sandbox", "patch", "x", "--data", "[" * 100_000], "INVALID_JSON: --data: nested too deeply"),
        (["sandbox", "create", "--id", "x", "--address", "10.75.1.40", "--allow-port", "https"], "INVALID_PORT"),
        (["sandbox", "create", "--id", "x", "--address", "10.75.1.40", "--label", "novalue"], "INVALID_LABEL"),
        (["sandbox", "frobnicate"], "invalid choice"),
        (
            ["sandbox", "create", "--id", "x", "--address", "10.75.1.40", "--egress-allow-port", "9" * 5000],
            "INVALID_PORT",
        ),
        (["sandbox", "create", "--id", "x", "--address", "10.75.1.40", "--egress-allow-port", "١٢٣"], "INVALID_PORT"),
        (["--api", "127.0.0.1:1", "status"], "must start with http://"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = gateway(*args, GATEWAY_API_URL="http://127.0.0.1:9")  # never contacted: usage is checked first
    assert result.returncode == 2, result
    assert message in result.stderr


def test_profiles_the_gateway_does_not_support_get_the_api_explanation(server: Server) -> None:
    result = gateway("sandbox", "create", "--id", "cli-l2", "--address", "10.75.1.50", "--profile", "transit",
                     server=server)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("PROFILE_NOT_SUPPORTED: the transit profile") and "(field profile)" in result.stderr


def test_changing_or_deleting_a_sandbox_needs_its_profile_scope_before_anything_is_validated(server: Server) -> None:
    created = gateway(
        "sandbox", "create", "--id", "cli-scoped", "--address", "10.75.1.60", "--profile", "allowlisted",
        "--allow-host", "a.example.com", server=server,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    for args in (
        ("sandbox", "delete", "cli-scoped"),
        ("sandbox", "patch", "cli-scoped", "--data", '{"egress": {"allow_hosts": ["*.anything.example"]}}'),
        ("sandbox", "patch", "cli-scoped", "--data", '{"egress": {"allow_hosts": ["https://bad"]}}'),  # 403, not 400
        ("sandbox", "update", "cli-scoped", "--data", '{"addresses": "not a list", "profile": "allowlisted"}'),
        ("sandbox", "create", "--data", '{"id": "Bad Id", "addresses": [], "profile": "unrestricted"}'),
    ):
        refused = gateway(*args, server=server, token=LIMITED_TOKEN)
        assert refused.returncode == 1 and refused.stderr.startswith("NETWORK_PROFILE_DENIED: "), (args, refused)
    kept = json.loads(gateway("sandbox", "get", "cli-scoped", "--json", server=server).stdout)
    assert kept["egress"] == {"allow_hosts": ["a.example.com"]}
    assert gateway("sandbox", "delete", "cli-scoped", server=server).returncode == 0


# --------------------------------------------------------------------------- what a new operator types first


def test_the_readme_egress_flags_work_on_sandboxes_and_templates(server: Server) -> None:
    # Exactly the README's example: "allow everything but a subnet".
    created = gateway(
        "sandbox", "create", "--id", "ci-7", "--address", "10.75.0.7", "--profile", "unrestricted",
        "--egress-allow-cidr", "0.0.0.0/0", "--egress-deny-cidr", "10.0.0.0/8", "--json", server=server,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["egress"] == {
        "mode": "deny_all", "allow_cidrs": ["0.0.0.0/0"], "deny_cidrs": ["10.0.0.0/8"],
    }  # fmt: skip
    allowed = gateway("explain", "ci-7", "198.51.100.7:443", server=server)
    assert (allowed.returncode, allowed.stdout.split()[0]) == (0, "ALLOW")
    denied = gateway("explain", "ci-7", "10.1.2.3:443", server=server)
    assert denied.returncode == 4 and denied.stdout.startswith("DENY  10.1.2.3:443  address in deny_cidrs 10.0.0.0/8")
    # Repeatable, with ports, an explicit mode, and on templates too.
    ported = gateway(
        "sandbox", "create", "--id", "ci-8", "--address", "10.75.0.8", "--profile", "allowlisted",
        "--egress-mode", "deny_all", "--egress-allow-cidr", "1.1.1.1/32", "--egress-allow-cidr", "1.0.0.1/32",
        "--egress-allow-port", "443", "--json", server=server,
    )  # fmt: skip
    assert json.loads(ported.stdout)["egress"] == {
        "mode": "deny_all", "allow_cidrs": ["1.1.1.1/32", "1.0.0.1/32"], "allow_ports": [443],
    }  # fmt: skip
    template = gateway(
        "template", "create", "--name", "secure-python", "--egress-mode", "deny_all",
        "--egress-allow-cidr", "0.0.0.0/0", "--egress-deny-cidr", "10.0.0.0/8", "--egress-deny-cidr", "172.16.0.0/12",
        "--egress-deny-cidr", "192.168.0.0/16", "--json", server=server,
    )  # fmt: skip
    assert template.returncode == 0, template.stderr
    assert json.loads(template.stdout)["egress"]["deny_cidrs"] == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
    conflict = gateway(
        "sandbox", "create", "--id", "ci-9", "--address", "10.75.0.9", "--profile", "unrestricted",
        "--egress-mode", "allow_all", "--egress-deny-cidr", "10.0.0.0/8", server=server,
    )  # fmt: skip
    assert conflict.returncode == 1 and conflict.stderr.startswith("EGRESS_MODE_CONFLICT: ")
    for name in ("ci-7", "ci-8"):
        assert gateway("sandbox", "delete", name, server=server).returncode == 0
    assert gateway("template", "delete", "secure-python", server=server).returncode == 0


def test_the_readme_deny_host_example_and_host_port_entries(server: Server) -> None:
    created = gateway(
        "sandbox", "create", "--id", "web-3", "--address", "10.75.0.3", "--profile", "unrestricted",
        "--deny-host", "*.tracker.example", "--deny-host", "ads.example:443", "--json", server=server,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["egress"] == {"deny_hosts": ["*.tracker.example", "ads.example:443"]}  # no mode
    denied = gateway("explain", "web-3", "x.tracker.example", server=server)
    assert denied.returncode == 4 and verdict_line(denied.stdout) == (
        "DENY  x.tracker.example:443  host x.tracker.example denied by deny_hosts *.tracker.example  "
        "(rule deny_hosts *.tracker.example)\n"
    )
    assert gateway("explain", "web-3", "ads.example:443", server=server).returncode == 4
    assert gateway("explain", "web-3", "ads.example:80", "--protocol", "http", server=server).returncode == 0
    assert gateway("explain", "web-3", "example.org", server=server).returncode == 0
    ported = gateway(
        "sandbox", "create", "--id", "web-4", "--address", "10.75.0.4", "--profile", "allowlisted",
        "--allow-host", "api.example.com:8443", server=server,
    )  # fmt: skip
    assert ported.returncode == 0, ported.stderr
    assert gateway("explain", "web-4", "api.example.com:8443", server=server).returncode == 0
    refused = gateway("explain", "web-4", "api.example.com:443", server=server)
    assert refused.returncode == 4 and "(rule allow_hosts api.example.com:8443)" in refused.stdout, refused.stdout
    bad = gateway("sandbox", "patch", "web-4", "--data", '{"egress": {"deny_hosts": ["a.example:0"]}}', server=server)
    assert bad.returncode == 1 and bad.stderr.startswith("INVALID_PORT: ") and "egress.deny_hosts[0]" in bad.stderr
    for name in ("web-3", "web-4"):
        assert gateway("sandbox", "delete", name, server=server).returncode == 0


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (["sandbox", "create", "--id", "x", "--address", "10.75.1.40", "--bogus"], "usage: gateway sandbox create"),
        (["sandbox", "create", "--id", "x", "--allow-cidrs", "1.1.1.1/32"], "usage: gateway sandbox create"),
        (["template", "create", "--name", "t", "extra"], "usage: gateway template create"),
        (["explain", "sb", "a.com", "b.com"], "usage: gateway explain"),
        (["sandbox", "list", "--colour"], "usage: gateway sandbox list"),
        (["tunnel", "list", "sb", "--nope"], "usage: gateway tunnel list"),
        (["status", "now"], "usage: gateway status"),
    ],
)
def test_usage_errors_print_the_subcommands_usage(args: list[str], usage: str) -> None:
    result = gateway(*args, GATEWAY_API_URL="http://127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.startswith(usage), result.stderr
    assert "unrecognized arguments" in result.stderr
    assert not result.stderr.startswith("usage: gateway [-h]")


def test_version() -> None:
    from gateway import __version__

    result = gateway("--version")
    assert (result.returncode, result.stdout) == (0, f"gateway {__version__}\n")


def test_explain_says_when_the_address_decides(server: Server) -> None:
    created = gateway(
        "sandbox", "create", "--id", "cidr-only", "--address", "10.75.1.70", "--profile", "allowlisted",
        "--egress-allow-cidr", "198.51.100.0/24", server=server,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    by_name = gateway("explain", "cidr-only", "api.example.com", server=server)
    assert by_name.returncode == 4
    assert "allow_cidrs decide by the destination address, which was not given" in by_name.stdout
    with_address = gateway("explain", "cidr-only", "api.example.com", "--address", "198.51.100.9", server=server)
    assert with_address.returncode == 0 and with_address.stdout.startswith("ALLOW  api.example.com:443 via ")
    # A DNS question is decided on the name alone (the resolver answers only allowed names): no such hint.
    dns = gateway("explain", "cidr-only", "api.example.com", "--protocol", "dns", server=server)
    assert dns.returncode == 4 and "address" not in dns.stdout.split("(rule")[0]
    assert gateway("sandbox", "delete", "cidr-only", server=server).returncode == 0


def test_explain_decides_an_http_request_on_an_inspected_host(server: Server) -> None:
    entry = {"hosts": ["api.github.com"], "methods": ["GET"], "headers": [{"name": "accept", "prefix": "application/"}]}
    record = {"id": "inspected", "addresses": ["10.75.1.75"], "profile": "allowlisted", "egress": {"inspect": [entry]}}
    created = gateway("sandbox", "create", "--data", json.dumps(record), server=server)
    assert created.returncode == 0, created.stderr
    read = gateway("explain", "inspected", "api.github.com", "--method", "GET", "--path", "/repos/a?x=1", server=server)
    assert (read.returncode, verdict_line(read.stdout)) == (
        0,
        "ALLOW  GET api.github.com:443 /repos/a  host api.github.com allowed by inspect api.github.com  "
        "(rule inspect api.github.com)\n  if its headers also match: accept: application/...\n",
    )
    write = gateway("explain", "inspected", "api.github.com", "--method", "POST", server=server)
    assert (write.returncode, verdict_line(write.stdout)) == (
        4,
        "DENY  POST api.github.com:443 /  method POST not allowed (allowed: GET)  (rule inspect api.github.com)\n",
    )
    bad = gateway("explain", "inspected", "api.github.com", "--path", "no-slash", server=server)
    assert bad.returncode == 1 and bad.stderr.startswith("INVALID_PATH: ") and bad.stderr.endswith("(field path)\n")
    assert gateway("sandbox", "delete", "inspected", server=server).returncode == 0


RAW_EPOCH = re.compile(r"\b1[5-9]\d{8}(\.\d+)?\b")


def test_human_output_has_no_python_none_and_no_raw_epochs(server: Server) -> None:
    policies = server.config.parent / "policies.json"
    created = gateway(
        "sandbox", "create", "--id", "human", "--address", "10.75.1.80", "--profile", "registry", server=server
    )
    assert created.returncode == 0, created.stderr
    template = gateway("template", "create", "--name", "plain", server=server)  # no description, no egress
    assert template.returncode == 0, template.stderr
    data = json.loads(policies.read_text())
    data["sandboxes"]["broken"] = {"id": "broken", "addresses": ["not an address"]}
    policies.write_text(json.dumps(data))  # a rejection, which has a time
    assert wait_until(lambda: "broken" in gateway("status", server=server).stdout, 10)
    outputs = [
        gateway(*args, server=server)
        for args in (
            ("sandbox", "list"),
            ("sandbox", "get", "human"),
            ("sandbox", "policy", "human"),
            ("template", "list"),
            ("template", "get", "plain"),
            ("status",),
            ("presets",),
            ("explain", "human", "pypi.org"),
            ("audit", "list", "human"),
            ("policy", "revisions", "human"),
            ("policy", "diff", "human", "--data", '{"addresses": ["10.75.1.80"], "profile": "registry"}'),
        )
    ]
    for result in outputs:
        assert result.returncode in (0, 4), result.stderr
        assert "None" not in result.stdout and "True" not in result.stdout and "False" not in result.stdout
        assert not RAW_EPOCH.search(result.stdout), result.stdout
    status = outputs[5].stdout
    assert re.search(r"sandbox broken since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(\d+ s ago\): ", status), status
    assert "description: -" in outputs[4].stdout
    assert outputs[-1].stdout.startswith("sandbox human: 0 records since "), outputs[-1].stdout
    data["sandboxes"].pop("broken")
    policies.write_text(json.dumps(data))
    assert gateway("sandbox", "delete", "human", server=server).returncode == 0
    assert gateway("template", "delete", "plain", server=server).returncode == 0


def test_format_time_is_iso_utc_and_relative() -> None:
    from gateway.formatting import format_time

    assert format_time(1_800_000_000, now=1_800_000_000) == "2027-01-15T08:00:00Z (0 s ago)"
    assert format_time(1_800_000_000, now=1_800_000_090) == "2027-01-15T08:00:00Z (1 min ago)"
    assert format_time(1_800_000_000, now=1_799_992_800) == "2027-01-15T08:00:00Z (in 2 h)"
    assert format_time(1_800_000_000, now=1_800_259_200) == "2027-01-15T08:00:00Z (3 d ago)"


@pytest.mark.root
def test_attach_and_detach_print_a_table_unless_json() -> None:
    name = f"gw-cli-none-{os.getpid()}"  # never created: detach of an unknown namespace changes nothing
    table = gateway("sandbox", "detach", "--netns", name, token=None)
    assert (table.returncode, table.stdout) == (0, f"netns:   {name}\nremoved: no\n"), table.stderr
    as_json = gateway("sandbox", "detach", "--netns", name, "--json", token=None)
    assert json.loads(as_json.stdout) == {"netns": name, "removed": False}


@pytest.mark.parametrize(
    ("options", "code", "expected"),
    [
        ({"tunnel": ["enabled = true", 'cert_path = "{dir}/none.crt"', 'key_path = "{dir}/none.key"']},
         "CERT_INVALID", "(field tunnel.cert_path)"),
        ({"resolver": ['upstreams = ["dns.example"]']}, "CONFIG_INVALID", "(field resolver.upstreams[0])"),
        ({"resolver": ['upstreams = ["192.0.2.53:53", "192.0.2.54:x"]']}, "CONFIG_INVALID", "resolver.upstreams[1])"),
        ({"resolver": [f'upstreams = ["192.0.2.53:{"9" * 5000}"]']}, "CONFIG_INVALID", "resolver.upstreams[0])"),
        ({"store": ['redis_url = "http://user:hunter2@example.com/"']}, "CONFIG_INVALID", "not a Redis URL"),
        ({"store": ['redis_url = "redis://:hunter2@127.0.0.1:abc/0"']}, "CONFIG_INVALID", "not a Redis URL"),
        ({"store": ['backend = "redis"']}, "CONFIG_INVALID", "needs store.redis_url"),
        ({"api": ['host = "0.0.0.0"']}, "CONFIG_INVALID", "(field api.tokens)"),
    ],
)  # fmt: skip
def test_check_config_refuses_what_run_refuses(
    tmp_path: Path, options: dict[str, list[str]], code: str, expected: str
) -> None:
    sections = {"store": [f'path = "{tmp_path}/p.json"'], "api": [f"port = {free_port()}"]}
    for section, lines in options.items():
        sections.setdefault(section, []).extend(line.format(dir=tmp_path) for line in lines)
    config = tmp_path / "gateway.toml"
    config.write_text(
        "".join(f"[{name}]\n" + "".join(f"{line}\n" for line in lines) for name, lines in sections.items())
    )
    checked = gateway("check-config", "--config", str(config))
    ran = gateway("run", "--config", str(config))
    for result in (checked, ran):
        assert result.returncode == 2, result
        assert result.stderr.startswith(f"{code}: ") and expected in result.stderr, result.stderr
        assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
    assert checked.stderr == ran.stderr  # one validation, so one answer


def test_run_reports_a_policy_file_it_cannot_create_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    config = tmp_path / "gateway.toml"
    config.write_text(f'[store]\npath = "{tmp_path}/a-file/policies.json"\n[api]\nport = {free_port()}\n')
    result = gateway("run", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith(f"STORE_UNAVAILABLE: embedded {tmp_path}/a-file/policies.json: ")
    assert "Traceback" not in result.stderr
