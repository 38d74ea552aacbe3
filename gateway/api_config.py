"""The control API's options: the `[api]` section (where it listens, its bearer tokens and their scopes).

Apart from gateway/config.py's sections so that the API can read its tokens without the whole configuration."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, ClassVar, Final

import msgspec
from msgspec import Meta

from gateway.config import LIVE, OptionError, Section
from gateway.policy import ID_PATTERN

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
#: Scopes whose routes act across sandboxes (every template's sandboxes, the gateway's totals, everything): a
#: token limited to some sandboxes cannot hold them, so its limit cannot be stepped around.
GATEWAY_WIDE_SCOPES: Final = ("admin", "templates:write", "metrics:read")
SANDBOXES_DOC: Final = (
    'The sandboxes the token may see and act on: ids, or prefixes ending in `*` (["tenant-a-*", "ci-42"]). Others '
    f"answer 404 as if absent; the token cannot hold {', '.join(GATEWAY_WIDE_SCOPES)}. Absent: every sandbox."
)
#: The most patterns one token's `sandboxes` may list.
MAX_SANDBOX_PATTERNS: Final = 100


class SandboxScope:
    """The sandboxes a token may see and act on: exact ids, or prefixes (a pattern `tenant-a-*`)."""

    __slots__ = ("exact", "patterns", "prefixes")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        self.exact = frozenset(p for p in patterns if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))

    def __contains__(self, sandbox_id: object) -> bool:
        return isinstance(sandbox_id, str) and (sandbox_id in self.exact or sandbox_id.startswith(self.prefixes))


def check_sandbox_patterns(where: str, patterns: tuple[str, ...]) -> None:
    """Raise OptionError (at `where`, or `where[i]`) unless every pattern is a sandbox id or an id prefix and `*`."""
    if not patterns:
        raise OptionError(where, "sandboxes must list at least one sandbox id or prefix* (leave it out for every "
                          "sandbox)")  # fmt: skip
    if len(patterns) > MAX_SANDBOX_PATTERNS:
        raise OptionError(where, f"sandboxes lists {len(patterns)} patterns; at most {MAX_SANDBOX_PATTERNS}")
    for index, pattern in enumerate(patterns):
        shown = repr(pattern) if len(pattern) <= 70 else f"{pattern[:40]!r}... ({len(pattern)} characters)"
        stem = pattern.removesuffix("*")
        if "*" in stem:
            raise OptionError(f"{where}[{index}]", f"{shown}: '*' may only end a pattern (a prefix such as "
                              "tenant-a-*), once")  # fmt: skip
        if not stem:
            raise OptionError(f"{where}[{index}]", "'*' alone is every sandbox: leave sandboxes out instead")
        if not ID_PATTERN.fullmatch(stem):
            raise OptionError(f"{where}[{index}]", f"{shown} is not a sandbox id or an id prefix followed by '*': "
                              "1-63 characters, lowercase letters, digits, '-' and '_', starting with a letter "
                              "or digit")  # fmt: skip


class ApiToken(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One bearer token. After loading, `token_sha256` holds the digest and `token` is empty: the plain token is
    never kept."""

    noun: ClassVar[str] = "token"  # in messages: "unknown token option(s) ..."

    name: Annotated[str, Meta(description="Shown in logs and `check-config` (default token-<index>).")] = ""
    token: Annotated[str, Meta(description="The plain token, at least 16 characters (prefer the environment).")] = ""
    token_sha256: Annotated[str, Meta(description="The hex SHA-256 of the token (prefer this in files).")] = ""
    scopes: Annotated[frozenset[str], Meta(description="What the token may do (see [api] tokens).")] = frozenset()
    sandboxes: Annotated[
        tuple[str, ...] | None,
        Meta(description=SANDBOXES_DOC),
    ] = None

    @property
    def scope(self) -> SandboxScope | None:
        """The sandboxes it is limited to (None: every sandbox)."""
        return None if self.sandboxes is None else SandboxScope(self.sandboxes)

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
    if entry.sandboxes is not None:
        check_sandbox_patterns(f"{where}.sandboxes", entry.sandboxes)
        wide = [scope for scope in GATEWAY_WIDE_SCOPES if scope in entry.scopes]
        if wide:
            raise OptionError(f"{where}.scopes", f"a token limited to some sandboxes cannot hold {', '.join(wide)}: "
                              "its routes act across every sandbox; give those scopes to another token")  # fmt: skip
    return ApiToken(entry.name or f"token-{index}", "", digest, entry.scopes, entry.sandboxes)


class ApiConfig(Section, frozen=True):
    """The control API. With no tokens configured it only starts on a loopback address and
    then allows every call (development); configure tokens for anything else."""

    host: Annotated[str, Meta(description="The address the API listens on.")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535, description="Its TCP port.")] = 8470
    tokens: Annotated[
        tuple[ApiToken, ...],
        Meta(
            description="Bearer tokens with scopes: tables {name, token | token_sha256, scopes, sandboxes}. Prefer "
            "token_sha256 (hex SHA-256 of the token) in files, and plain `token` only from the environment "
            "(GATEWAY_API__TOKENS). "
            f"Scopes: {', '.join(SCOPES)}. `sandboxes` limits a token to those sandboxes (ids, or prefixes ending "
            "in `*`): others answer as absent, and it cannot hold "
            f"{', '.join(GATEWAY_WIDE_SCOPES)}; without it a token covers every sandbox.",
            examples=[
                {
                    "name": "platform",
                    "token_sha256": "<64 hex digits>",
                    "scopes": ["sandboxes:read", "sandboxes:write", "network:registry", "network:allowlisted"],
                },
                {"name": "viewer", "token_sha256": "<64 hex digits>", "scopes": ["sandboxes:read", "templates:read"]},
                {
                    "name": "tenant-a",
                    "token_sha256": "<64 hex digits>",
                    "scopes": ["sandboxes:read", "sandboxes:write", "network:allowlisted", "audit:read"],
                    "sandboxes": ["tenant-a-*"],
                },
            ],
            extra=LIVE,
        ),
    ] = ()

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "tokens", tuple(_checked(i, t) for i, t in enumerate(self.tokens)))
