"""The inspection tier's options: the `[inspection]` section.

Secrets are referenced, never written here: each names an environment variable (`env`) or a file (`file`,
its first line, trailing newline removed) read when the tier starts, so the config file can be shared and
committed. A policy's credential binding names a secret; `secret_names()` is what the policy parser checks
those names against, `secret_values()` what the supervisor hands the tier.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from gateway.config import OptionError, Section
from gateway.errors import GatewayError
from gateway.hostnames import normalize_pattern

SECRET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_SECRET_BYTES = 16384


class SecretSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where one secret's value is read: exactly one of an environment variable or a file."""

    env: str | None = None
    file: Path | None = None


class InspectionConfig(Section, frozen=True):
    """The opt-in inspection tier: a mitmproxy process on loopback that decrypts the connections of hosts a
    policy marks (egress.inspect), enforces their HTTP rules and injects credentials. Secrets:
    [inspection.secrets] github = { env = "GITHUB_TOKEN" }  or  { file = "/run/secrets/github" }."""

    listen_port: Annotated[
        int, Meta(ge=1, le=65535, description="The tier's port on 127.0.0.1 (the engine hands connections to it).")
    ] = 15080
    ca_dir: Annotated[
        Path,
        Meta(description="The inspection CA (mitmproxy's confdir: mitmproxy-ca.pem, mitmproxy-ca-cert.pem)."),
    ] = Path("certs/inspection")
    permitted_domains: Annotated[
        tuple[str, ...],
        Meta(
            max_length=50,
            description="Name constraints of a new CA: it can vouch only for these names and the names under "
            "them (empty: unconstrained).",
        ),
    ] = ()
    exclude_hosts: Annotated[
        tuple[str, ...],
        Meta(
            max_length=1000,
            description="Hosts (or *. patterns) never decrypted (certificate pinning, mTLS): they stay on the "
            "fast path, still checked by name.",
        ),
    ] = ()
    secrets: Annotated[
        dict[str, SecretSource], Meta(description="Secrets credential bindings name: NAME = { env | file }.")
    ] = msgspec.field(default_factory=dict)
    upstream_ca_file: Annotated[
        Path | None,
        Meta(description="Extra CA bundle the tier trusts for upstream servers (besides the public roots)."),
    ] = None
    restart_backoff: Annotated[
        float, Meta(ge=0.01, le=60, description="Seconds before the first restart of a tier that died...")
    ] = 0.5
    restart_backoff_max: Annotated[
        float, Meta(ge=0.01, le=3600, description="...doubling up to this (reset after it ran this long).")
    ] = 30.0
    start_timeout: Annotated[
        float, Meta(ge=1, le=300, description="Seconds the tier has to start listening, else it is restarted.")
    ] = 30.0

    def __post_init__(self) -> None:
        for key in ("permitted_domains", "exclude_hosts"):
            names = []
            for i, name in enumerate(getattr(self, key)):
                try:
                    names.append(normalize_pattern(name))
                except GatewayError as exc:
                    raise OptionError(f"{key}[{i}]", exc.message) from None
                if key == "permitted_domains" and names[-1].startswith("*."):
                    # A name constraint covers every name under it already.
                    raise OptionError(f"{key}[{i}]", f"give the domain ({names[-1][2:]}), not a *. pattern")
            msgspec.structs.force_setattr(self, key, tuple(names))
        for name, source in self.secrets.items():
            if not SECRET_NAME.fullmatch(name):
                raise OptionError(
                    f"secrets.{name}", f"{name!r} is not a secret name (a-z, 0-9, - and _, up to 63, lower case)"
                )
            if (source.env is None) == (source.file is None):
                raise OptionError(f"secrets.{name}", "a secret is read from exactly one of env or file")
        if self.restart_backoff_max < self.restart_backoff:
            raise OptionError("restart_backoff_max", "restart_backoff_max must be at least restart_backoff")

    def secret_names(self) -> frozenset[str]:
        return frozenset(self.secrets)

    def excluded(self, host: str) -> bool:
        """Whether `host` (normalised) is never decrypted: an exact `exclude_hosts` name or one under a `*.` entry
        (one extra label, as in allow_hosts)."""
        dot = host.find(".")
        return host in self.exclude_hosts or (dot > 0 and f"*.{host[dot + 1 :]}" in self.exclude_hosts)

    def secret_values(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Every secret's value, read now. Raises GatewayError(SECRET_UNAVAILABLE) naming the secret (never its
        value) when a variable is unset or a file cannot be read, is empty or holds a line break."""
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for name, source in self.secrets.items():
            where = f"inspection.secrets.{name}"
            if source.env is not None:
                value = env.get(source.env)
                if not value:
                    raise GatewayError("SECRET_UNAVAILABLE", f"secret {name}: ${source.env} is not set", where)
            else:
                assert source.file is not None  # SecretSource sets exactly one
                try:
                    data = source.file.read_bytes()[: MAX_SECRET_BYTES + 1]
                    value = data.decode().removesuffix("\n").removesuffix("\r")
                except (OSError, UnicodeDecodeError) as exc:
                    reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                    raise GatewayError("SECRET_UNAVAILABLE", f"secret {name}: {source.file}: {reason}", where) from None
                if len(data) > MAX_SECRET_BYTES:
                    raise GatewayError("SECRET_UNAVAILABLE", f"secret {name}: {source.file} is too long", where)
                if not value:
                    raise GatewayError("SECRET_UNAVAILABLE", f"secret {name}: {source.file} is empty", where)
            if "\r" in value or "\n" in value or "\0" in value:
                # A header value cannot carry these; a secret holding them would split the request.
                raise GatewayError("SECRET_UNAVAILABLE", f"secret {name}: the value holds a line break or NUL", where)
            values[name] = value
        return values
