"""The control API's options: the `[api]` section (where it listens, its bearer tokens and their scopes).

Apart from gateway/config.py's sections so that the API can read its tokens without the whole configuration."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta

from gateway.config import LIVE, OptionError, Section

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
    "metrics:read",
)


class ApiToken(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One bearer token. After loading, `token_sha256` holds the digest and `token` is empty: the plain token is
    never kept."""

    noun: ClassVar[str] = "token"  # in messages: "unknown token option(s) ..."

    name: Annotated[str, Meta(description="Shown in logs and `check-config` (default token-<index>).")] = ""
    token: Annotated[str, Meta(description="The plain token, at least 16 characters (prefer the environment).")] = ""
    token_sha256: Annotated[str, Meta(description="The hex SHA-256 of the token (prefer this in files).")] = ""
    scopes: Annotated[frozenset[str], Meta(description="What the token may do (see [api] tokens).")] = frozenset()

    def matches(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode()).hexdigest()
        return hmac.compare_digest(digest, self.token_sha256)


def _checked(index: int, entry: ApiToken) -> ApiToken:
    where = f"tokens[{index}]"
    if bool(entry.token) == bool(entry.token_sha256):
        raise OptionError(where, "give exactly one of token (plain) or token_sha256 (hex digest)")
    if entry.token:
        if len(entry.token) < 16:
            raise OptionError(f"{where}.token", "a token must be at least 16 characters")
        digest = hashlib.sha256(entry.token.encode()).hexdigest()
    else:
        digest = entry.token_sha256.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise OptionError(f"{where}.token_sha256", "token_sha256 must be 64 hex digits")
    if not entry.scopes:
        raise OptionError(f"{where}.scopes", f"scopes must be a non-empty list of: {', '.join(SCOPES)}")
    for scope in sorted(entry.scopes):
        if scope not in SCOPES:
            raise OptionError(f"{where}.scopes", f"unknown scope {scope!r}; known: {', '.join(SCOPES)}")
    return ApiToken(entry.name or f"token-{index}", "", digest, entry.scopes)


class ApiConfig(Section, frozen=True):
    """The control API. With no tokens configured it only starts on a loopback address and
    then allows every call (development); configure tokens for anything else."""

    host: Annotated[str, Meta(description="The address the API listens on.")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535, description="Its TCP port.")] = 8470
    tokens: Annotated[
        tuple[ApiToken, ...],
        Meta(
            description="Bearer tokens with scopes: tables {name, token | token_sha256, scopes}. Prefer token_sha256 "
            "(hex SHA-256 of the token) in files, and plain `token` only from the environment (GATEWAY_API__TOKENS). "
            f"Scopes: {', '.join(SCOPES)}.",
            examples=[
                {
                    "name": "platform",
                    "token_sha256": "<64 hex digits>",
                    "scopes": ["sandboxes:read", "sandboxes:write", "network:registry", "network:allowlisted"],
                },
                {"name": "viewer", "token_sha256": "<64 hex digits>", "scopes": ["sandboxes:read", "templates:read"]},
            ],
            extra=LIVE,
        ),
    ] = ()

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "tokens", tuple(_checked(i, t) for i, t in enumerate(self.tokens)))
