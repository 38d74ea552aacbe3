"""Tunnel service configuration: the `[tunnel]` section of the gateway's TOML file.

`gateway.config.load_config` reads it like every other section (defaults, the file,
`GATEWAY_TUNNEL__<KEY>` environment variables) and validates it with `build_tunnel_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError

#: Every `[tunnel]` option and its default. Paths are relative to the working directory.
DEFAULTS: dict[str, Any] = {
    # `gateway run` starts the tunnel server only when enabled (it needs the certificate: `gateway certs init`).
    "enabled": False,
    # Tunnel URLs are https://<label>.<domain>/ ; *.localhost resolves to loopback in browsers.
    "domain": "tunnel.localhost",
    "host": "127.0.0.1",
    "port": 8443,
    # The port people reach (a load balancer may publish 443 while we listen on 8443); 0: same as `port`.
    "public_port": 0,
    # The wildcard certificate and key the server presents (`gateway certs init` writes them).
    "cert_path": "certs/tunnel.crt",
    "key_path": "certs/tunnel.key",
    # The local CA that signs the leaf (only used by `gateway certs init`).
    "ca_cert_path": "certs/ca.crt",
    "ca_key_path": "certs/ca.key",
    # Tunnel records (embedded store): "" puts tunnels.json next to the policy file.
    "path": "",
    "max_per_sandbox": 20,  # seed 003: up to 20 ports per workspace
    "default_ttl": 8 * 3600.0,  # seconds; seed 000: "until the session ends or manually closed"
    "max_ttl": 7 * 24 * 3600.0,
    "session_ttl": 12 * 3600.0,  # a login session never outlives its tunnel either
    "login_free_failures": 5,  # password attempts per client and tunnel before backoff starts
    # Password attempts per tunnel, all clients together: a bucket of `burst` refilled at `rate` a second.
    # When it is empty every client waits under 1/rate seconds (the longest the right password can be refused).
    "login_tunnel_rate": 1.0,
    "login_tunnel_burst": 20,
    "login_window": 900.0,  # seconds after which failures (and sign-ins, for the tunnel's bucket) are forgotten
    "login_max_backoff": 300.0,  # seconds, the longest lockout
    "connect_timeout": 5.0,  # seconds to reach the sandbox port before answering 502
    "sweep_interval": 0.25,  # seconds between checks that close connections of dead tunnels
    "poll_interval": 0.5,  # seconds between checks of the tunnels file (embedded store)
}


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    enabled: bool = DEFAULTS["enabled"]
    domain: str = DEFAULTS["domain"]
    host: str = DEFAULTS["host"]
    port: int = DEFAULTS["port"]
    public_port: int = DEFAULTS["public_port"]
    cert_path: Path = Path(DEFAULTS["cert_path"])
    key_path: Path = Path(DEFAULTS["key_path"])
    ca_cert_path: Path = Path(DEFAULTS["ca_cert_path"])
    ca_key_path: Path = Path(DEFAULTS["ca_key_path"])
    path: Path | None = None
    max_per_sandbox: int = DEFAULTS["max_per_sandbox"]
    default_ttl: float = DEFAULTS["default_ttl"]
    max_ttl: float = DEFAULTS["max_ttl"]
    session_ttl: float = DEFAULTS["session_ttl"]
    login_free_failures: int = DEFAULTS["login_free_failures"]
    login_tunnel_rate: float = DEFAULTS["login_tunnel_rate"]
    login_tunnel_burst: int = DEFAULTS["login_tunnel_burst"]
    login_window: float = DEFAULTS["login_window"]
    login_max_backoff: float = DEFAULTS["login_max_backoff"]
    connect_timeout: float = DEFAULTS["connect_timeout"]
    sweep_interval: float = DEFAULTS["sweep_interval"]
    poll_interval: float = DEFAULTS["poll_interval"]

    @property
    def origin_port(self) -> int:
        return self.public_port or self.port

    def url_for(self, label: str) -> str:
        port = "" if self.origin_port == 443 else f":{self.origin_port}"
        return f"https://{label}.{self.domain}{port}/"

    def store_path(self, policy_path: Path) -> Path:
        return self.path if self.path is not None else Path(policy_path).with_name("tunnels.json")


def _invalid(message: str, key: str) -> GatewayError:
    return GatewayError("CONFIG_INVALID", message, f"tunnel.{key}")


def _number(value: Any, key: str, low: float, high: float, *, integer: bool = False) -> Any:
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        raise _invalid(f"expected {'an integer' if integer else 'a number'} in {low:g}-{high:g}, got {value!r}", key)
    return value


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"expected a string, got {type(value).__name__}", key)
    return value


def build_tunnel_config(values: Mapping[str, Any]) -> TunnelConfig:
    """Validate a `[tunnel]` table (unknown keys are refused, missing ones take the defaults)."""
    unknown = set(values) - set(DEFAULTS)
    if unknown:
        key = sorted(unknown)[0]
        raise _invalid(f"unknown option tunnel.{key}; known: {', '.join(sorted(DEFAULTS))}", key)
    v = {**DEFAULTS, **values}
    domain = _text(v["domain"], "domain").strip().lower().rstrip(".")
    labels = domain.split(".")
    if (
        not domain
        or any(not label or len(label) > 63 for label in labels)
        or not all(c.isascii() and (c.isalnum() or c in "-.") for c in domain)
    ):
        raise _invalid(f"{domain!r} is not a DNS name", "domain")
    path = _text(v["path"], "path")
    if not isinstance(v["enabled"], bool):
        raise _invalid(f"expected true or false, got {v['enabled']!r}", "enabled")
    return TunnelConfig(
        enabled=v["enabled"],
        domain=domain,
        host=_text(v["host"], "host"),
        port=_number(v["port"], "port", 1, 65535, integer=True),
        public_port=_number(v["public_port"], "public_port", 0, 65535, integer=True),
        cert_path=Path(_text(v["cert_path"], "cert_path")),
        key_path=Path(_text(v["key_path"], "key_path")),
        ca_cert_path=Path(_text(v["ca_cert_path"], "ca_cert_path")),
        ca_key_path=Path(_text(v["ca_key_path"], "ca_key_path")),
        path=Path(path) if path else None,
        max_per_sandbox=_number(v["max_per_sandbox"], "max_per_sandbox", 1, 1000, integer=True),
        default_ttl=float(_number(v["default_ttl"], "default_ttl", 1, 365 * 86400)),
        max_ttl=float(_number(v["max_ttl"], "max_ttl", 1, 365 * 86400)),
        session_ttl=float(_number(v["session_ttl"], "session_ttl", 1, 365 * 86400)),
        login_free_failures=_number(v["login_free_failures"], "login_free_failures", 1, 1000, integer=True),
        login_tunnel_rate=float(_number(v["login_tunnel_rate"], "login_tunnel_rate", 0.01, 1000)),
        login_tunnel_burst=_number(v["login_tunnel_burst"], "login_tunnel_burst", 1, 100000, integer=True),
        login_window=float(_number(v["login_window"], "login_window", 1, 86400)),
        login_max_backoff=float(_number(v["login_max_backoff"], "login_max_backoff", 0, 86400)),
        connect_timeout=float(_number(v["connect_timeout"], "connect_timeout", 0.1, 120)),
        sweep_interval=float(_number(v["sweep_interval"], "sweep_interval", 0.01, 1)),
        poll_interval=float(_number(v["poll_interval"], "poll_interval", 0.01, 60)),
    )


def shared_site_warning(domain: str) -> str | None:
    """A warning when tunnels under `domain` would share one site in browsers, else None.

    Browsers scope cookies to a site: the name one label below a public suffix. Unless `domain` itself is a
    public suffix, every `<id>.<domain>` is one site, so one tunnel's page can set cookies (Domain=<domain>)
    that every other tunnel's app receives. The check uses the Public Suffix List bundled with the
    `publicsuffixlist` package (offline; the rule for names it does not know, `*`, is the browsers' too)."""
    from publicsuffixlist import PublicSuffixList

    if PublicSuffixList().is_public(domain):
        return None
    return (
        f"tunnel domain {domain} is not a public suffix: all tunnels share one site, so a tunnel's page can "
        "set cookies that other tunnels' apps receive (the gateway's own login cookie stays safe); use a "
        "domain on the Public Suffix List to isolate them"
    )
