"""Configuration: one TOML file with documented defaults, every option overridable by environment.

Environment variables are `GATEWAY_<SECTION>__<KEY>` (double underscore between
section and key), e.g. `GATEWAY_STORE__REDIS_URL=redis://127.0.0.1:6379/0`. A value
is read as a TOML value when it parses as one (numbers, booleans, lists, inline
tables) and as a plain string otherwise. `GATEWAY_CONFIG` names the file.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.decision import DEFAULT_LIMITS
from gateway.errors import GatewayError
from gateway.policy import LIMIT_RANGES, IPAddress, IPNetwork, Limits
from gateway.presets import BUILTIN_PRESETS, Preset, make_preset
from gateway.state import PolicyContext
from gateway.tunnel.config import DEFAULTS as TUNNEL_DEFAULTS
from gateway.tunnel.config import TunnelConfig, build_tunnel_config

ENV_PREFIX = "GATEWAY_"
SCOPES = (
    "admin",
    "sandboxes:read",
    "sandboxes:write",
    "templates:read",
    "templates:write",
    "network:registry",
    "network:allowlisted",
    "network:unrestricted",
    "audit:read",
    "tunnels:read",
    "tunnels:write",
)

DEFAULTS: dict[str, dict[str, Any]] = {
    "network": {"sandbox_subnets": ["10.75.0.0/16", "fdd4:1476:6c7e::/48"]},
    "store": {
        "backend": "auto",
        "path": "var/policies.json",
        "poll_interval": 0.5,
        "redis_url": "",
        "redis_prefix": "gw:",
        "stream_maxlen": 100_000,
        "resync_interval": 60.0,
        "node_id": "",
    },
    "api": {"host": "127.0.0.1", "port": 8470, "tokens": []},
    "limits": {
        "connections_per_minute": DEFAULT_LIMITS.connections_per_minute,
        "bandwidth_mbit": DEFAULT_LIMITS.bandwidth_mbit,
        "burst_mbit": DEFAULT_LIMITS.burst_mbit,
        "dns_queries_per_minute": DEFAULT_LIMITS.dns_queries_per_minute,
    },
    "log": {"format": "auto", "level": "info"},
    "egress": {
        "listen_port": 15001,
        "dns_port": 15053,
        "peek_timeout": 5.0,
        "peek_max_bytes": 16384,
        "max_peeking_per_sandbox": 64,
        "max_peeking_total": 4096,
        "connect_timeout": 10.0,
        "idle_timeout": 300.0,
        "rate_limit_max_wait": 5.0,
        "blocklist_path": "",
        "public_ranges": [],
        "gateway_addresses": [],
        "sandbox_interfaces": ["vif*"],
        "fwmark": 1,
        "route_table": 100,
        "dial_mark": 2,
        "unattached_log_interval": 10.0,
    },
    "resolver": {"upstreams": [], "timeout": 2.0, "min_ttl": 5, "max_ttl": 3600},
    "dns": {
        "malware_blocklist": "",
        "blocklist_check_interval": 1.0,
        "blocked_ttl": 10,
        "negative_max_ttl": 300,
        "other_qtypes": "empty",
        "extra_qtypes": [],
        "require_ad": False,
        "cache_per_sandbox": 2048,
        "cache_total": 200_000,
        "rate_limit_max_wait": 1.0,
        "tcp_idle_timeout": 10.0,
        "tcp_max_connections": 1024,
        "tcp_max_per_sandbox": 64,
        "max_inflight": 4096,
        "max_inflight_per_sandbox": 256,
        "query_log_size": 1000,
    },
    "tunnel": dict(TUNNEL_DEFAULTS),
    "audit": {"dir": "var/audit", "flush_interval": 1.0, "redis_stream": "", "redis_maxlen": 100_000},
    "presets": {},
}


def _invalid(message: str, where: str) -> GatewayError:
    return GatewayError("CONFIG_INVALID", message, where)


@dataclass(frozen=True, slots=True)
class ApiToken:
    name: str
    sha256: str
    scopes: frozenset[str]

    def matches(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode()).hexdigest()
        return hmac.compare_digest(digest, self.sha256)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    backend: str
    path: Path
    poll_interval: float
    redis_url: str
    redis_prefix: str
    stream_maxlen: int
    resync_interval: float
    node_id: str


@dataclass(frozen=True, slots=True)
class EgressConfig:
    listen_port: int
    dns_port: int
    peek_timeout: float
    peek_max_bytes: int
    max_peeking_per_sandbox: int
    max_peeking_total: int
    connect_timeout: float
    idle_timeout: float
    rate_limit_max_wait: float
    blocklist_path: Path | None
    public_ranges: tuple[IPNetwork, ...]
    gateway_addresses: tuple[IPAddress, ...]
    sandbox_interfaces: tuple[str, ...]
    fwmark: int
    route_table: int
    dial_mark: int
    unattached_log_interval: float


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    upstreams: tuple[str, ...]  # "address" or "address:port" / "[v6]:port"; empty: /etc/resolv.conf
    timeout: float
    min_ttl: int
    max_ttl: int


@dataclass(frozen=True, slots=True)
class DnsSection:
    """`[dns]`: the interceptor's own options (its port and upstreams come from [egress] and [resolver])."""

    malware_blocklist: Path | None
    blocklist_check_interval: float
    blocked_ttl: int
    negative_max_ttl: int
    other_qtypes: str
    extra_qtypes: frozenset[int]
    require_ad: bool
    cache_per_sandbox: int
    cache_total: int
    rate_limit_max_wait: float
    tcp_idle_timeout: float
    tcp_max_connections: int
    tcp_max_per_sandbox: int
    max_inflight: int
    max_inflight_per_sandbox: int
    query_log_size: int


@dataclass(frozen=True, slots=True)
class AuditConfig:
    dir: Path
    flush_interval: float
    redis_stream: str
    redis_maxlen: int


@dataclass(frozen=True, slots=True)
class Config:
    sandbox_subnets: tuple[IPNetwork, ...]
    store: StoreConfig
    api_host: str
    api_port: int
    tokens: tuple[ApiToken, ...]
    default_limits: Limits
    log_format: str
    log_level: str
    egress: EgressConfig
    resolver: ResolverConfig
    dns: DnsSection
    tunnel: TunnelConfig
    audit: AuditConfig
    presets: Mapping[str, Preset] = field(default_factory=dict)
    source: str = "defaults"

    def policy_context(self) -> PolicyContext:
        return PolicyContext(self.sandbox_subnets, self.presets, self.default_limits)


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge(base: dict[str, dict[str, Any]], overlay: Mapping[str, Any], where: str) -> None:
    for section, values in overlay.items():
        if section not in base:
            raise _invalid(f"unknown section [{section}]; known: {', '.join(sorted(base))}", f"{where}:{section}")
        if not isinstance(values, Mapping):
            raise _invalid(f"[{section}] must be a table", f"{where}:{section}")
        for key, value in values.items():
            if section != "presets" and key not in DEFAULTS[section]:
                known = ", ".join(sorted(DEFAULTS[section]))
                raise _invalid(f"unknown option {section}.{key}; known: {known}", f"{where}:{section}.{key}")
            base[section][key] = value


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file, then environment overrides. Raises GatewayError(CONFIG_INVALID)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, dict[str, Any]] = {section: dict(values) for section, values in DEFAULTS.items()}
    path = path or environ.get(f"{ENV_PREFIX}CONFIG")
    source = "defaults"
    if path:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise _invalid(f"config file {path} does not exist", str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise _invalid(f"config file {path} is not valid TOML: {exc}", str(path)) from None
        _merge(merged, data, str(path))
        source = str(path)
    overrides: dict[str, dict[str, Any]] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        # String options take the text as it is, so GATEWAY_STORE__NODE_ID=123 stays "123".
        is_text = isinstance(DEFAULTS.get(section, {}).get(key), str)
        overrides.setdefault(section, {})[key] = text if is_text else _parse_env_value(text)
    _merge(merged, overrides, "environment")
    return _build(merged, source)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"expected a string, got {type(value).__name__}", where)
    return value


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _invalid(f"expected a number in {low}-{high}, got {value!r}", where)
    return value


def _check_redis_url(url: str) -> None:
    """What the Redis client would refuse when `gateway run` connects, refused now. The URL is not repeated:
    it may hold a password."""
    from redis.asyncio.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        reason = f"not a Redis URL: {exc}; use redis://host:port/db, rediss://host:port/db or unix:///path"
        raise _invalid(reason, "store.redis_url") from None


def _build(merged: dict[str, dict[str, Any]], source: str) -> Config:
    net = merged["network"]
    subnets: list[IPNetwork] = []
    if not isinstance(net["sandbox_subnets"], list) or not net["sandbox_subnets"]:
        raise _invalid("expected a non-empty list of CIDRs", "network.sandbox_subnets")
    for index, text in enumerate(net["sandbox_subnets"]):
        try:
            subnets.append(ipaddress.ip_network(_str(text, "network.sandbox_subnets"), strict=True))
        except ValueError as exc:
            raise _invalid(f"{text!r} is not a CIDR ({exc})", f"network.sandbox_subnets[{index}]") from None

    st = merged["store"]
    backend = _str(st["backend"], "store.backend")
    if backend not in ("auto", "embedded", "redis"):
        raise _invalid(f"{backend!r} is not a store backend; use auto, embedded or redis", "store.backend")
    redis_url = _str(st["redis_url"], "store.redis_url")
    if backend == "auto":
        backend = "redis" if redis_url else "embedded"
    if backend == "redis" and not redis_url:
        raise _invalid("the redis backend needs store.redis_url (redis://host:port/db)", "store.redis_url")
    if redis_url:
        _check_redis_url(redis_url)
    store = StoreConfig(
        backend=backend,
        path=Path(_str(st["path"], "store.path")),
        poll_interval=_number(st["poll_interval"], "store.poll_interval", 0.05, 60),
        redis_url=redis_url,
        redis_prefix=_str(st["redis_prefix"], "store.redis_prefix"),
        stream_maxlen=int(_number(st["stream_maxlen"], "store.stream_maxlen", 100, 10_000_000)),
        resync_interval=_number(st["resync_interval"], "store.resync_interval", 1, 86_400),
        node_id=_str(st["node_id"], "store.node_id") or os.uname().nodename,
    )

    api = merged["api"]
    tokens = _tokens(api["tokens"])

    limit_values: dict[str, int] = {}
    for name, value in merged["limits"].items():
        low, high = LIMIT_RANGES[name]
        limit_values[name] = int(_number(value, f"limits.{name}", low, high))
    if limit_values["burst_mbit"] < limit_values["bandwidth_mbit"]:
        raise _invalid("burst_mbit must be at least bandwidth_mbit", "limits.burst_mbit")

    log = merged["log"]
    log_format = _str(log["format"], "log.format")
    if log_format not in ("auto", "json", "console"):
        raise _invalid(f"{log_format!r} is not a log format; use auto, json or console", "log.format")
    level = _str(log["level"], "log.level").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise _invalid(f"{level!r} is not a log level", "log.level")

    presets: dict[str, Preset] = dict(BUILTIN_PRESETS)
    for name, spec in merged["presets"].items():
        where = f"presets.{name}"
        if name in BUILTIN_PRESETS:
            raise _invalid(f"{name!r} is a built-in preset; choose another name", where)
        if not isinstance(spec, Mapping) or not isinstance(spec.get("hosts"), list) or not spec["hosts"]:
            raise _invalid("a preset is a table with a non-empty hosts list (and optional ports, description)", where)
        unknown = set(spec) - {"hosts", "ports", "description"}
        if unknown:
            raise _invalid(f"unknown preset option(s) {', '.join(sorted(unknown))}", where)
        try:
            presets[name] = make_preset(name, spec["hosts"], spec.get("ports"), str(spec.get("description", "")))
        except GatewayError as exc:
            raise _invalid(exc.message, exc.field or where) from None

    audit = _audit(merged["audit"])
    if audit.redis_stream and not store.redis_url:
        raise _invalid("the flow-record mirror writes to the Redis at store.redis_url; set it", "audit.redis_stream")

    return Config(
        sandbox_subnets=tuple(subnets),
        store=store,
        api_host=_str(api["host"], "api.host"),
        api_port=int(_number(api["port"], "api.port", 1, 65535)),
        tokens=tokens,
        default_limits=Limits(**limit_values),
        log_format=log_format,
        log_level=level,
        egress=_egress(merged["egress"]),
        resolver=_resolver(merged["resolver"]),
        dns=_dns(merged["dns"]),
        tunnel=build_tunnel_config(merged["tunnel"]),
        audit=audit,
        presets=presets,
        source=source,
    )


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid("expected a list of strings", where)
    return value


def _networks(value: Any, where: str) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for index, text in enumerate(_str_list(value, where)):
        try:
            out.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise _invalid(f"{text!r} is not a CIDR ({exc})", f"{where}[{index}]") from None
    return tuple(out)


def _egress(section: dict[str, Any]) -> EgressConfig:
    def num(key: str, low: float, high: float) -> float:
        return _number(section[key], f"egress.{key}", low, high)

    addresses: list[IPAddress] = []
    for index, text in enumerate(_str_list(section["gateway_addresses"], "egress.gateway_addresses")):
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            raise _invalid(f"{text!r} is not an IP address", f"egress.gateway_addresses[{index}]") from None
    blocklist = _str(section["blocklist_path"], "egress.blocklist_path")
    config = EgressConfig(
        listen_port=int(num("listen_port", 1, 65535)),
        dns_port=int(num("dns_port", 1, 65535)),
        peek_timeout=num("peek_timeout", 0.05, 120),
        peek_max_bytes=int(num("peek_max_bytes", 1024, 1 << 20)),
        max_peeking_per_sandbox=int(num("max_peeking_per_sandbox", 1, 1_000_000)),
        max_peeking_total=int(num("max_peeking_total", 1, 10_000_000)),
        connect_timeout=num("connect_timeout", 0.1, 300),
        idle_timeout=num("idle_timeout", 1, 86_400),
        rate_limit_max_wait=num("rate_limit_max_wait", 0, 300),
        blocklist_path=Path(blocklist) if blocklist else None,
        public_ranges=_networks(section["public_ranges"], "egress.public_ranges"),
        gateway_addresses=tuple(addresses),
        sandbox_interfaces=tuple(_str_list(section["sandbox_interfaces"], "egress.sandbox_interfaces")),
        fwmark=int(num("fwmark", 1, 0xFFFFFFFF)),
        route_table=int(num("route_table", 1, 0xFFFFFFFE)),
        dial_mark=int(num("dial_mark", 1, 0xFFFFFFFF)),
        unattached_log_interval=num("unattached_log_interval", 1, 3600),
    )
    if config.listen_port == config.dns_port:
        raise _invalid("listen_port and dns_port must differ", "egress.dns_port")
    if config.fwmark & config.dial_mark:
        raise _invalid(
            "dial_mark must share no bit with fwmark (dialled packets would be steered back)", "egress.dial_mark"
        )
    return config


def _resolver(section: dict[str, Any]) -> ResolverConfig:
    from gateway.resolver import parse_upstream  # here: gateway.resolver imports this module

    upstreams = tuple(_str_list(section["upstreams"], "resolver.upstreams"))
    for index, text in enumerate(upstreams):
        try:
            parse_upstream(text)
        except ValueError as exc:
            raise _invalid(
                f"{exc}; an upstream is an address with an optional port (192.0.2.53, 192.0.2.53:5353, "
                "[2001:db8::53]:53): the resolver cannot resolve its own name",
                f"resolver.upstreams[{index}]",
            ) from None
    min_ttl = int(_number(section["min_ttl"], "resolver.min_ttl", 0, 86_400))
    max_ttl = int(_number(section["max_ttl"], "resolver.max_ttl", 1, 604_800))
    if min_ttl > max_ttl:
        raise _invalid("min_ttl must not exceed max_ttl", "resolver.min_ttl")
    return ResolverConfig(upstreams, _number(section["timeout"], "resolver.timeout", 0.05, 60), min_ttl, max_ttl)


def _dns(section: dict[str, Any]) -> DnsSection:
    def num(key: str, low: float, high: float) -> float:
        return _number(section[key], f"dns.{key}", low, high)

    other = _str(section["other_qtypes"], "dns.other_qtypes")
    if other not in ("empty", "refuse"):
        raise _invalid(f"{other!r} is not a choice; use empty or refuse", "dns.other_qtypes")
    extra = section["extra_qtypes"]
    if not isinstance(extra, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in extra):
        raise _invalid("expected a list of DNS type numbers (e.g. [33] for SRV)", "dns.extra_qtypes")
    for qtype in extra:
        if not 1 <= qtype <= 65535 or qtype in (251, 252, 255):  # IXFR, AXFR, ANY are always refused
            raise _invalid(f"{qtype} is not a type that can be forwarded", "dns.extra_qtypes")
    if not isinstance(section["require_ad"], bool):
        raise _invalid("expected true or false", "dns.require_ad")
    blocklist = _str(section["malware_blocklist"], "dns.malware_blocklist")
    return DnsSection(
        malware_blocklist=Path(blocklist) if blocklist else None,
        blocklist_check_interval=num("blocklist_check_interval", 0.05, 3600),
        blocked_ttl=int(num("blocked_ttl", 0, 86_400)),
        negative_max_ttl=int(num("negative_max_ttl", 0, 86_400)),
        other_qtypes=other,
        extra_qtypes=frozenset(extra),
        require_ad=section["require_ad"],
        cache_per_sandbox=int(num("cache_per_sandbox", 0, 10_000_000)),
        cache_total=int(num("cache_total", 0, 100_000_000)),
        rate_limit_max_wait=num("rate_limit_max_wait", 0, 30),
        tcp_idle_timeout=num("tcp_idle_timeout", 0.1, 3600),
        tcp_max_connections=int(num("tcp_max_connections", 1, 1_000_000)),
        tcp_max_per_sandbox=int(num("tcp_max_per_sandbox", 1, 1_000_000)),
        max_inflight=int(num("max_inflight", 1, 10_000_000)),
        max_inflight_per_sandbox=int(num("max_inflight_per_sandbox", 1, 10_000_000)),
        query_log_size=int(num("query_log_size", 0, 1_000_000)),
    )


def _audit(section: dict[str, Any]) -> AuditConfig:
    return AuditConfig(
        dir=Path(_str(section["dir"], "audit.dir")),
        flush_interval=_number(section["flush_interval"], "audit.flush_interval", 0.05, 3600),
        redis_stream=_str(section["redis_stream"], "audit.redis_stream"),
        redis_maxlen=int(_number(section["redis_maxlen"], "audit.redis_maxlen", 100, 100_000_000)),
    )


def _tokens(raw: Any) -> tuple[ApiToken, ...]:
    if not isinstance(raw, list):
        raise _invalid("expected a list of {name, token | token_sha256, scopes}", "api.tokens")
    tokens: list[ApiToken] = []
    for index, entry in enumerate(raw):
        where = f"api.tokens[{index}]"
        if not isinstance(entry, Mapping):
            raise _invalid("expected a table {name, token | token_sha256, scopes}", where)
        unknown = set(entry) - {"name", "token", "token_sha256", "scopes"}
        if unknown:
            raise _invalid(f"unknown token option(s) {', '.join(sorted(unknown))}", where)
        name = _str(entry.get("name", f"token-{index}"), f"{where}.name")
        if ("token" in entry) == ("token_sha256" in entry):
            raise _invalid("give exactly one of token (plain) or token_sha256 (hex digest)", where)
        if "token" in entry:
            secret = _str(entry["token"], f"{where}.token")
            if len(secret) < 16:
                raise _invalid("a token must be at least 16 characters", f"{where}.token")
            digest = hashlib.sha256(secret.encode()).hexdigest()
        else:
            digest = _str(entry["token_sha256"], f"{where}.token_sha256").lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise _invalid("token_sha256 must be 64 hex digits", f"{where}.token_sha256")
        scopes = entry.get("scopes", [])
        if not isinstance(scopes, list) or not scopes:
            raise _invalid(f"scopes must be a non-empty list of: {', '.join(SCOPES)}", f"{where}.scopes")
        for scope in scopes:
            if scope not in SCOPES:
                raise _invalid(f"unknown scope {scope!r}; known: {', '.join(SCOPES)}", f"{where}.scopes")
        tokens.append(ApiToken(name, digest, frozenset(scopes)))
    return tuple(tokens)
