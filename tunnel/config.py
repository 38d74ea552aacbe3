"""Tunnel service configuration: the `[tunnel]` section of the gateway's TOML file.

`gateway.settings.load_config` reads it like every other section (defaults, the file,
`GATEWAY_TUNNEL__<KEY>` environment variables); the model below declares and checks each option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from gateway.config import OptionError, Section
from gateway.hostnames import is_public_suffix

_YEAR = 365 * 86400


class TunnelConfig(Section, frozen=True):
    """Temporary HTTPS URLs https://<label>.<domain>/ for sandbox ports. `gateway run` serves them only
    when enabled; it needs the wildcard certificate (`gateway certs init` creates a local CA and it).

    Password attempts (counted before the hash): login_free_failures per client and tunnel before its backoff,
    the window in which they count and the longest backoff (seconds); per tunnel, all clients together, a
    bucket of login_tunnel_burst attempts refilled at login_tunnel_rate a second (when it is empty, every
    client, the right password included, waits under 1/rate s; a client that signed in to the tunnel within
    login_window is not held by it)."""

    enabled: Annotated[bool, Meta(description="Serve tunnels with `gateway run` (needs the certificate).")] = False
    domain: Annotated[
        str,
        Meta(description="Tunnel URLs are https://<label>.<domain>/ ; *.localhost resolves to loopback in browsers."),
    ] = "tunnel.localhost"
    host: Annotated[str, Meta(description="The address the tunnel server listens on.")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535, description="Its port.")] = 8443
    public_port: Annotated[
        int,
        Meta(
            ge=0,
            le=65535,
            description="The port people reach, if a load balancer publishes another one (0: same as port).",
        ),
    ] = 0
    cert_path: Annotated[
        Path, Meta(description="The wildcard certificate the server presents (`gateway certs init`).")
    ] = Path("certs/tunnel.crt")
    key_path: Annotated[Path, Meta(description="Its key.")] = Path("certs/tunnel.key")
    ca_cert_path: Annotated[
        Path, Meta(description="The local CA that signs it (used only by `gateway certs init`).")
    ] = Path("certs/ca.crt")
    ca_key_path: Annotated[Path, Meta(description="The CA's key.")] = Path("certs/ca.key")
    path: Annotated[
        Path | None,
        Meta(description='Tunnel records with the embedded store: "" puts tunnels.json next to the policy file.'),
    ] = None
    max_per_sandbox: Annotated[int, Meta(ge=1, le=1000, description="Tunnels per sandbox (seed 003).")] = 20
    default_ttl: Annotated[
        float,
        Meta(
            ge=1,
            le=_YEAR,
            description='Seconds a tunnel lives unless asked otherwise (seed 000: "until the session ends").',
        ),
    ] = 8 * 3600.0
    max_ttl: Annotated[float, Meta(ge=1, le=_YEAR, description="The longest a tunnel may live (s).")] = 7 * 24 * 3600.0
    session_ttl: Annotated[
        float, Meta(ge=1, le=_YEAR, description="Login sessions (s; never longer than the tunnel).")
    ] = 12 * 3600.0
    login_free_failures: Annotated[
        int, Meta(ge=1, le=1000, description="Password attempts per client and tunnel before backoff starts.")
    ] = 5
    login_tunnel_rate: Annotated[
        float, Meta(ge=0.01, le=1000, description="Per tunnel, all clients together: attempts refilled a second...")
    ] = 1.0
    login_tunnel_burst: Annotated[int, Meta(ge=1, le=100000, description="...into a bucket of this many.")] = 20
    login_window: Annotated[
        float,
        Meta(
            ge=1,
            le=86400,
            description="Seconds after which failures (and sign-ins, for the tunnel's bucket) are forgotten.",
        ),
    ] = 900.0
    login_max_backoff: Annotated[float, Meta(ge=0, le=86400, description="Seconds, the longest lockout.")] = 300.0
    connect_timeout: Annotated[
        float, Meta(ge=0.1, le=120, description="Seconds to reach the sandbox port, then 502.")
    ] = 5.0
    sweep_interval: Annotated[
        float, Meta(ge=0.01, le=1, description="How often connections of revoked/expired tunnels are closed (s).")
    ] = 0.25
    poll_interval: Annotated[
        float, Meta(ge=0.01, le=60, description="How often the tunnels file is checked (embedded store; s).")
    ] = 0.5

    def __post_init__(self) -> None:
        domain = self.domain.strip().lower().rstrip(".")
        labels = domain.split(".")
        if (
            not domain
            or any(not label or len(label) > 63 for label in labels)
            or not all(c.isascii() and (c.isalnum() or c in "-.") for c in domain)
        ):
            raise OptionError("domain", f"{domain!r} is not a DNS name")
        msgspec.structs.force_setattr(self, "domain", domain)

    @property
    def origin_port(self) -> int:
        return self.public_port or self.port

    def url_for(self, label: str) -> str:
        port = "" if self.origin_port == 443 else f":{self.origin_port}"
        return f"https://{label}.{self.domain}{port}/"

    def store_path(self, policy_path: Path) -> Path:
        return self.path if self.path is not None else Path(policy_path).with_name("tunnels.json")


def shared_site_warning(domain: str) -> str | None:
    """A warning when tunnels under `domain` would share one site in browsers, else None.

    Browsers scope cookies to a site: the name one label below a public suffix. Unless `domain` itself is a
    public suffix, every `<id>.<domain>` is one site, so one tunnel's page can set cookies (Domain=<domain>)
    that every other tunnel's app receives. The check uses the Public Suffix List bundled with the
    `publicsuffixlist` package (offline; the rule for names it does not know, `*`, is the browsers' too)."""
    if is_public_suffix(domain):
        return None
    return (
        f"tunnel domain {domain} is not a public suffix: all tunnels share one site, so a tunnel's page can "
        "set cookies that other tunnels' apps receive (the gateway's own login cookie stays safe); use a "
        "domain on the Public Suffix List to isolate them"
    )
