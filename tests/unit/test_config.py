"""Configuration: defaults, the TOML file, environment overrides, and every CONFIG_INVALID rule."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path

import pytest

from gateway.decision import DEFAULT_LIMITS
from gateway.errors import GatewayError
from gateway.policy import Limits
from gateway.presets import BUILTIN_PRESETS
from gateway.settings import Config, load_config

TOKEN = "s3cret-token-0123456789"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def invalid(tmp_path: Path, text: str = "", environ: dict[str, str] | None = None) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        load_config(write(tmp_path, text) if text else None, environ=environ or {})
    assert info.value.code == "CONFIG_INVALID"
    return info.value


# --------------------------------------------------------------------------- defaults, file, environment


def test_defaults() -> None:
    config = load_config(environ={})
    assert config.source == "defaults"
    assert config.network.sandbox_subnets == (
        ipaddress.ip_network("10.75.0.0/16"),
        ipaddress.ip_network("fdd4:1476:6c7e::/48"),
    )
    assert config.store.backend == "embedded"
    assert config.store.path == Path("var/policies.json")
    assert config.store.redis_url == ""
    assert config.store.redis_prefix == "gw:"
    assert config.store.node_id == os.uname().nodename
    assert (config.api.host, config.api.port) == ("127.0.0.1", 8470)
    assert config.api.tokens == ()
    assert config.limits.limits() == DEFAULT_LIMITS == Limits(1000, 100, 1000, 500)
    assert (config.log.format, config.log.level) == ("auto", "info")
    assert dict(config.presets) == dict(BUILTIN_PRESETS)


def test_policy_context_follows_the_config() -> None:
    config = load_config(environ={})
    context = config.policy_context()
    assert context.subnets == config.network.sandbox_subnets
    assert context.presets == config.presets
    assert context.default_limits == config.limits.limits()


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[network]
sandbox_subnets = ["10.80.0.0/16"]

[store]
backend = "embedded"
path = "/var/lib/gateway/policies.json"
poll_interval = 2.0
node_id = "node-7"

[api]
host = "0.0.0.0"
port = 9000

[limits]
bandwidth_mbit = 50
burst_mbit = 60

[log]
format = "json"
level = "DEBUG"
""",
    )
    config = load_config(path, environ={})
    assert config.source == str(path)
    assert config.network.sandbox_subnets == (ipaddress.ip_network("10.80.0.0/16"),)
    assert config.store.path == Path("/var/lib/gateway/policies.json")
    assert config.store.poll_interval == 2.0
    assert config.store.node_id == "node-7"
    assert (config.api.host, config.api.port) == ("0.0.0.0", 9000)
    assert config.limits.limits() == Limits(1000, 50, 60, 500)
    assert (config.log.format, config.log.level) == ("json", "debug")


def test_config_file_named_by_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[api]\nport = 9100\n")
    config = load_config(environ={"GATEWAY_CONFIG": str(path)})
    assert config.api.port == 9100
    assert config.source == str(path)


def test_env_redis_url_selects_redis() -> None:
    config = load_config(environ={"GATEWAY_STORE__REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert config.store.backend == "redis"
    assert config.store.redis_url == "redis://127.0.0.1:6379/0"


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nport = 9000\nhost = "0.0.0.0"\n')
    config = load_config(path, environ={"GATEWAY_API__PORT": "9001"})
    assert (config.api.host, config.api.port) == ("0.0.0.0", 9001)


def test_env_values_use_toml_syntax_for_lists_tables_and_numbers() -> None:
    config = load_config(
        environ={
            "GATEWAY_NETWORK__SANDBOX_SUBNETS": '["10.90.0.0/16", "fd00:1::/64"]',
            "GATEWAY_PRESETS__INTERNAL": '{hosts = ["*.corp.example", "git.corp.example"], ports = [443]}',
            "GATEWAY_LIMITS__BANDWIDTH_MBIT": "20",
            "GATEWAY_STORE__POLL_INTERVAL": "1.5",
            "GATEWAY_LOG__FORMAT": "console",  # not TOML: a plain string
        }
    )
    assert config.network.sandbox_subnets == (ipaddress.ip_network("10.90.0.0/16"), ipaddress.ip_network("fd00:1::/64"))
    assert config.presets["internal"].hosts == ("*.corp.example", "git.corp.example")
    assert config.presets["internal"].ports == frozenset({443})
    assert config.limits.limits().bandwidth_mbit == 20
    assert config.store.poll_interval == 1.5
    assert config.log.format == "console"


def test_unrelated_environment_is_ignored() -> None:
    config = load_config(environ={"GATEWAY_SOMETHING": "x", "PATH": "/bin", "GATEWAYX__A": "1"})
    assert config.source == "defaults"


# --------------------------------------------------------------------------- CONFIG_INVALID


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GatewayError) as info:
        load_config(tmp_path / "nope.toml", environ={})
    assert info.value.code == "CONFIG_INVALID"
    assert "does not exist" in info.value.message


def test_file_that_is_not_toml(tmp_path: Path) -> None:
    assert "not valid TOML" in invalid(tmp_path, "[api\nport = ").message


def test_unknown_section_in_the_file(tmp_path: Path) -> None:
    error = invalid(tmp_path, "[bogus]\nx = 1\n")
    assert "unknown section [bogus]" in error.message
    assert error.field is not None and error.field.endswith(":bogus")


def test_unknown_option_in_the_file(tmp_path: Path) -> None:
    error = invalid(tmp_path, "[store]\nredis = 'x'\n")
    assert "unknown option store.redis" in error.message
    assert error.field is not None and error.field.endswith(":store.redis")


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    assert "must be a table" in invalid(tmp_path, "api = 5\n").message


@pytest.mark.parametrize(
    ("name", "says"),
    [("GATEWAY_BOGUS__X", "unknown section [bogus]"), ("GATEWAY_STORE__NOPE", "unknown option store.nope")],
)
def test_unknown_section_or_option_in_the_environment(tmp_path: Path, name: str, says: str) -> None:
    error = invalid(tmp_path, environ={name: "1"})
    assert says in error.message
    assert error.field is not None and error.field.startswith("environment:")


@pytest.mark.parametrize(
    ("subnets", "field"),
    [
        ('["10.75.0.1/16"]', "network.sandbox_subnets[0]"),  # host bits set
        ('["10.75.0.0/16", "nonsense"]', "network.sandbox_subnets[1]"),
        ("[]", "network.sandbox_subnets"),
        ('"10.75.0.0/16"', "network.sandbox_subnets"),
        ("[5]", "network.sandbox_subnets[0]"),
    ],
)
def test_bad_subnet(tmp_path: Path, subnets: str, field: str) -> None:
    assert invalid(tmp_path, f"[network]\nsandbox_subnets = {subnets}\n").field == field


def test_bad_backend(tmp_path: Path) -> None:
    error = invalid(tmp_path, '[store]\nbackend = "etcd"\n')
    assert error.field == "store.backend"
    assert "auto, embedded or redis" in error.message


@pytest.mark.parametrize("url", ["", "localhost:6379", "http://redis:6379"])
def test_redis_backend_needs_a_redis_url(tmp_path: Path, url: str) -> None:
    error = invalid(tmp_path, f'[store]\nbackend = "redis"\nredis_url = "{url}"\n')
    assert error.field == "store.redis_url"


@pytest.mark.parametrize("url", ["redis://r:6379/0", "rediss://r:6380/1", "unix:///run/redis.sock"])
def test_redis_urls_accepted(url: str) -> None:
    assert load_config(environ={"GATEWAY_STORE__REDIS_URL": url}).store.backend == "redis"


def test_embedded_backend_may_keep_a_redis_url(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[store]\nbackend = "embedded"\nredis_url = "redis://r/0"\n'), environ={})
    assert config.store.backend == "embedded"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[store]\npoll_interval = 0\n", "store.poll_interval"),
        ("[store]\npoll_interval = true\n", "store.poll_interval"),
        ("[store]\nstream_maxlen = 10\n", "store.stream_maxlen"),
        ("[api]\nport = 0\n", "api.port"),
        ("[api]\nport = 70000\n", "api.port"),
        ('[api]\nport = "8470"\n', "api.port"),
        ("[api]\nhost = 5\n", "api.host"),
        ('[log]\nformat = "xml"\n', "log.format"),
        ('[log]\nlevel = "verbose"\n', "log.level"),
        ("[limits]\nbandwidth_mbit = 0\n", "limits.bandwidth_mbit"),
        ("[limits]\ndns_queries_per_minute = -1\n", "limits.dns_queries_per_minute"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, field: str) -> None:
    assert invalid(tmp_path, text).field == field


def test_burst_below_sustained(tmp_path: Path) -> None:
    error = invalid(tmp_path, "[limits]\nbandwidth_mbit = 2000\n")  # default burst 1000
    assert error.field == "limits.burst_mbit"
    assert "at least bandwidth_mbit" in error.message
    config = load_config(write(tmp_path, "[limits]\nbandwidth_mbit = 2000\nburst_mbit = 2000\n"), environ={})
    assert (config.limits.limits().bandwidth_mbit, config.limits.limits().burst_mbit) == (2000, 2000)


# --------------------------------------------------------------------------- API tokens


def tokens_config(tmp_path: Path, body: str) -> Config:
    return load_config(write(tmp_path, body), environ={})


def test_plain_and_hashed_tokens(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"another-token-abcdef").hexdigest()
    config = tokens_config(
        tmp_path,
        f"""
[[api.tokens]]
name = "ops"
token = "{TOKEN}"
scopes = ["admin"]

[[api.tokens]]
token_sha256 = "{digest.upper()}"
scopes = ["sandboxes:read", "network:registry"]
""",
    )
    ops, unnamed = config.api.tokens
    assert ops.name == "ops" and ops.scopes == frozenset({"admin"}) and ops.token == ""
    assert ops.token_sha256 == hashlib.sha256(TOKEN.encode()).hexdigest()  # the plain token is not kept
    assert ops.matches(TOKEN) and not ops.matches(TOKEN + "x")
    assert unnamed.name == "token-1"
    assert unnamed.token_sha256 == digest
    assert unnamed.matches("another-token-abcdef")


@pytest.mark.parametrize(
    ("entry", "field", "says"),
    [
        (f'token = "{TOKEN}"\ntoken_sha256 = "{"0" * 64}"\nscopes = ["admin"]', "api.tokens[0]", "exactly one"),
        ('scopes = ["admin"]', "api.tokens[0]", "exactly one"),
        ('token = "short-token-123"\nscopes = ["admin"]', "api.tokens[0].token", "at least 16"),  # 15 characters
        ('token = 1234567890123456789\nscopes = ["admin"]', "api.tokens[0].token", "expected a string"),
        (f'token_sha256 = "{"g" * 64}"\nscopes = ["admin"]', "api.tokens[0].token_sha256", "64 hex digits"),
        (f'token_sha256 = "{"0" * 63}"\nscopes = ["admin"]', "api.tokens[0].token_sha256", "64 hex digits"),
        (f'token = "{TOKEN}"\nscopes = ["root"]', "api.tokens[0].scopes", "unknown scope 'root'"),
        (f'token = "{TOKEN}"\nscopes = []', "api.tokens[0].scopes", "non-empty list"),
        (f'token = "{TOKEN}"', "api.tokens[0].scopes", "non-empty list"),
        (f'token = "{TOKEN}"\nscopes = ["admin"]\nexpires = 5', "api.tokens[0]", "unknown token option(s) expires"),
    ],
)
def test_token_rules(tmp_path: Path, entry: str, field: str, says: str) -> None:
    error = invalid(tmp_path, f"[[api.tokens]]\n{entry}\n")
    assert error.field == field
    assert says in error.message


def test_token_of_exactly_16_characters_is_accepted(tmp_path: Path) -> None:
    config = tokens_config(tmp_path, '[[api.tokens]]\ntoken = "0123456789abcdef"\nscopes = ["admin"]\n')
    assert config.api.tokens[0].matches("0123456789abcdef")


def test_tokens_must_be_a_list(tmp_path: Path) -> None:
    assert invalid(tmp_path, '[api]\ntokens = "x"\n').field == "api.tokens"
    assert invalid(tmp_path, "[api]\ntokens = [5]\n").field == "api.tokens[0]"


def test_a_token_limited_to_sandboxes_matches_ids_and_prefixes_only(tmp_path: Path) -> None:
    config = tokens_config(
        tmp_path,
        f'[[api.tokens]]\nname = "tenant"\ntoken = "{TOKEN}"\nscopes = ["sandboxes:read", "audit:read"]\n'
        'sandboxes = ["tenant-a-*", "ci-42"]\n'
        f'[[api.tokens]]\nname = "ops"\ntoken = "{TOKEN}x"\nscopes = ["admin"]\n',
    )
    tenant, ops = config.api.tokens
    assert tenant.sandboxes == ("tenant-a-*", "ci-42") and ops.sandboxes is None and ops.scope is None
    scope = tenant.scope
    assert scope is not None
    inside = ["tenant-a-", "tenant-a-1", "tenant-a-x_y", "ci-42"]
    outside = ["tenant-a", "tenant-b-1", "ci-4", "ci-421", "xtenant-a-1", "TENANT-A-1", ""]
    assert [i for i in inside if i in scope] == inside
    assert [o for o in outside if o in scope] == []


@pytest.mark.parametrize(
    ("sandboxes", "field", "says"),
    [
        ("[]", "api.tokens[0].sandboxes", "at least one sandbox id"),
        ('["ok", "Tenant-A"]', "api.tokens[0].sandboxes[1]", "'Tenant-A' is not a sandbox id or an id prefix"),
        ('["a*b"]', "api.tokens[0].sandboxes[0]", "'*' may only end a pattern"),
        ('["*a"]', "api.tokens[0].sandboxes[0]", "'*' may only end a pattern"),
        ('["a**"]', "api.tokens[0].sandboxes[0]", "'*' may only end a pattern"),
        ('["*"]', "api.tokens[0].sandboxes[0]", "leave sandboxes out"),
        ('["-a*"]', "api.tokens[0].sandboxes[0]", "is not a sandbox id"),
        ('["a b"]', "api.tokens[0].sandboxes[0]", "is not a sandbox id"),
        (f'["{"a" * 64}"]', "api.tokens[0].sandboxes[0]", "1-63 characters"),
        ('["a\\n"]', "api.tokens[0].sandboxes[0]", "is not a sandbox id"),
        ('"tenant-a-*"', "api.tokens[0].sandboxes", "expected array"),
        ('""', "api.tokens[0].sandboxes", "expected array"),
        ("[5]", "api.tokens[0].sandboxes[0]", "expected a string"),
        (str([f"s{i}" for i in range(101)]).replace("'", '"'), "api.tokens[0].sandboxes", "at most 100"),
    ],
)
def test_sandbox_patterns_are_checked(tmp_path: Path, sandboxes: str, field: str, says: str) -> None:
    entry = f'[[api.tokens]]\ntoken = "{TOKEN}"\nscopes = ["sandboxes:read"]\nsandboxes = {sandboxes}\n'
    error = invalid(tmp_path, entry)
    assert (error.field, says in error.message) == (field, True), error.message


@pytest.mark.parametrize("scope", ["admin", "templates:write", "metrics:read"])
def test_a_token_limited_to_sandboxes_cannot_hold_a_gateway_wide_scope(tmp_path: Path, scope: str) -> None:
    entry = f'[[api.tokens]]\ntoken = "{TOKEN}"\nscopes = ["sandboxes:read", "{scope}"]\nsandboxes = ["a-*"]\n'
    error = invalid(tmp_path, entry)
    assert error.field == "api.tokens[0].scopes"
    assert f"a token limited to some sandboxes cannot hold {scope}" in error.message
    # The same scopes without `sandboxes` are as before.
    assert tokens_config(tmp_path, entry.replace('sandboxes = ["a-*"]\n', "")).api.tokens[0].sandboxes is None


# --------------------------------------------------------------------------- operator presets


def test_custom_preset(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[presets.internal-apis]
description = "our services"
hosts = ["API.corp.example", "*.svc.corp.example", "bücher.example"]
ports = [443, 8443]

[presets.anyport]
hosts = ["files.corp.example"]
""",
        ),
        environ={},
    )
    internal = config.presets["internal-apis"]
    assert internal.hosts == ("api.corp.example", "*.svc.corp.example", "xn--bcher-kva.example")
    assert internal.ports == frozenset({443, 8443})
    assert internal.description == "our services"
    assert config.presets["anyport"].ports is None
    assert set(BUILTIN_PRESETS) <= set(config.presets)


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ('hosts = ["ok.example", "https://bad.example"]', "presets.p.hosts[1]", "is a URL"),
        ('hosts = ["*.com"]', "presets.p.hosts[0]", "top-level domain"),
        ("hosts = []", "presets.p", "non-empty hosts list"),
        ("ports = [443]", "presets.p", "non-empty hosts list"),
        ('hosts = "a.example"', "presets.p", "non-empty hosts list"),
        ('hosts = ["a.example"]\nports = [0]', "presets.p.ports", "not a port"),
        ('hosts = ["a.example"]\nports = ["443"]', "presets.p.ports", "not a port"),
        ('hosts = ["a.example"]\nports = [true]', "presets.p.ports", "not a port"),
        ('hosts = ["a.example"]\nports = 443', "presets.p.ports", "expected a list of ports"),
        ('hosts = ["a.example"]\nports = [[443]]', "presets.p.ports", "not a port"),
        ('hosts = ["a.example"]\nallow = true', "presets.p", "unknown preset option(s) allow"),
    ],
)
def test_invalid_custom_preset(tmp_path: Path, body: str, field: str, says: str) -> None:
    error = invalid(tmp_path, f"[presets.p]\n{body}\n")
    assert error.field == field
    assert says in error.message


@pytest.mark.parametrize("name", sorted(BUILTIN_PRESETS))
def test_custom_preset_may_not_replace_a_builtin(tmp_path: Path, name: str) -> None:
    error = invalid(tmp_path, f'[presets.{name}]\nhosts = ["evil.example"]\n')
    assert error.field == f"presets.{name}"
    assert "built-in preset" in error.message


def test_preset_that_is_not_a_table(tmp_path: Path) -> None:
    assert invalid(tmp_path, "[presets]\np = 5\n").field == "presets.p"


def test_string_options_take_environment_text_verbatim() -> None:
    config = load_config(environ={"GATEWAY_STORE__NODE_ID": "123", "GATEWAY_STORE__REDIS_PREFIX": "true"})
    assert (config.store.node_id, config.store.redis_prefix) == ("123", "true")


@pytest.mark.parametrize(
    ("environ", "field"),
    [
        ({"GATEWAY_EGRESS__DIAL_MARK": "1"}, "egress.dial_mark"),  # shares a bit with fwmark 1
        ({"GATEWAY_EGRESS__DNS_PORT": "15001"}, "egress.dns_port"),
        ({"GATEWAY_EGRESS__PUBLIC_RANGES": '["198.18.0.1/15"]'}, "egress.public_ranges[0]"),
        ({"GATEWAY_EGRESS__GATEWAY_ADDRESSES": '["gw"]'}, "egress.gateway_addresses[0]"),
        ({"GATEWAY_EGRESS__PEEK_TIMEOUT": "0"}, "egress.peek_timeout"),
        ({"GATEWAY_RESOLVER__MIN_TTL": "7200", "GATEWAY_RESOLVER__MAX_TTL": "60"}, "resolver.min_ttl"),
        ({"GATEWAY_RESOLVER__UPSTREAMS": "[1]"}, "resolver.upstreams[0]"),
        ({"GATEWAY_AUDIT__FLUSH_INTERVAL": "0"}, "audit.flush_interval"),
    ],
)
def test_data_plane_options_are_validated(environ: dict[str, str], field: str) -> None:
    with pytest.raises(GatewayError) as excinfo:
        load_config(environ=environ)
    assert (excinfo.value.code, excinfo.value.field) == ("CONFIG_INVALID", field)


def test_data_plane_options_from_environment() -> None:
    config = load_config(
        environ={
            "GATEWAY_EGRESS__PUBLIC_RANGES": '["198.18.0.0/15"]',
            "GATEWAY_RESOLVER__UPSTREAMS": '["198.18.1.53", "[2001:db8::53]:5353"]',
            "GATEWAY_EGRESS__BLOCKLIST_PATH": "/etc/gateway/blocklist.txt",
        }
    )
    assert [str(n) for n in config.egress.public_ranges] == ["198.18.0.0/15"]
    assert config.resolver.upstreams == ("198.18.1.53", "[2001:db8::53]:5353")
    assert str(config.egress.blocklist_path) == "/etc/gateway/blocklist.txt"
    assert load_config(environ={}).egress.blocklist_path is None
