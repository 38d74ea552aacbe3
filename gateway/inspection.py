"""The inspection tier's vocabulary: what a marked allow entry asks of the HTTP requests on its connections.

A policy's `egress.inspect` entries are allow entries (hosts, ports) that also carry HTTP rules and
credential bindings. The engine hands a connection to such a host to the inspection tier (a mitmproxy
process with the addon in `addons/`), together with an `InspectionContext`: who the sandbox is, which
host it named, and the entry that marked it. The tier then decides every request on its own.

These records are pure data shared by the policy parser (which builds them from JSON), the engine
(which sends the context) and the addon (which enforces it). Secrets are referenced by name only: the
values live in the gateway's `[inspection]` config and never in a policy record, in Redis or in a context.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from gateway.revisions import REVISION_PATTERN

#: HTTP methods an entry may allow (TRACE is refused by the tier whatever an entry says: it echoes headers).
HTTP_METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "CONNECT")
#: The environment variable that hands the tier's per-run token to egress worker processes (never a config option).
TIER_TOKEN_VARIABLE = "SANDBOX_GATEWAY_TIER_TOKEN"
#: The ports an entry marks when it names none.
DEFAULT_INSPECT_PORTS = (443,)
#: The first word of a hand-over line (see `handover_line`).
HANDOVER_VERSION = "GATEWAY-HANDOVER/1"
#: The tier's one-byte answer to a hand-over line it accepts, written before any byte of mitmproxy's.
HANDOVER_ACCEPTED = b"\x06"
#: A hand-over line is at most this long (a context carries one entry's rules: far less).
MAX_HANDOVER_LINE = 65536


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A request header condition: exactly one of `equals`, `prefix` or `absent` is set.

    `name` is lower-case. `equals`/`prefix` compare the value case-sensitively; with several copies of the
    header, every copy must match (a second copy cannot smuggle a value past the first)."""

    name: str
    equals: str | None = None
    prefix: str | None = None
    absent: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.equals is not None:
            out["equals"] = self.equals
        if self.prefix is not None:
            out["prefix"] = self.prefix
        if self.absent:
            out["absent"] = True
        return out


@dataclass(frozen=True, slots=True)
class Credential:
    """Bind request header `header` (lower-case) to the gateway-held secret named `secret`.

    The value sent upstream is `template` with `{secret}` replaced by the secret's value
    (`Bearer {secret}` for a bearer token). Whatever copy of the header the sandbox sent is removed."""

    header: str
    secret: str
    template: str = "{secret}"

    def to_dict(self) -> dict[str, Any]:
        return {"header": self.header, "secret": self.secret, "template": self.template}


@dataclass(frozen=True, slots=True)
class InspectRule:
    """One `egress.inspect` entry: an allow entry whose HTTP requests the tier decides.

    Empty `methods` / `paths` / `headers` mean "no restriction of that kind". A path entry ending in `*`
    is a prefix (`/repos/*`); otherwise it must equal the request path (query excluded) exactly or
    be followed by `/` (`/user` matches `/user` and `/user/emails`, never `/username`)."""

    hosts: tuple[str, ...]
    ports: tuple[int, ...] = DEFAULT_INSPECT_PORTS
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()
    deny_reason: str = ""
    credentials: tuple[Credential, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "hosts": list(self.hosts),
            "ports": list(self.ports),
            "methods": list(self.methods),
            "paths": list(self.paths),
            "headers": [h.to_dict() for h in self.headers],
            "deny_reason": self.deny_reason,
            "credentials": [c.to_dict() for c in self.credentials],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InspectRule:
        """The inverse of `to_dict` for records the gateway wrote itself (the policy parser validates input)."""
        return cls(
            hosts=tuple(data["hosts"]),
            ports=tuple(data["ports"]),
            methods=tuple(data["methods"]),
            paths=tuple(data["paths"]),
            headers=tuple(HeaderMatch(**h) for h in data["headers"]),
            deny_reason=data["deny_reason"],
            credentials=tuple(Credential(**c) for c in data["credentials"]),
        )


@dataclass(frozen=True, slots=True)
class InspectionContext:
    """What the engine tells the tier about one handed-over connection.

    `host` is the name the sandbox gave (SNI, or Host for plain HTTP) and was allowed by `rule`;
    `entry` is the pattern of `rule` that matched (`api.example.com`, `*.example.com`). The addresses are the
    sandbox's side of the connection (its source, and the destination it dialled), for the tier's flow records:
    the tier itself only sees the engine's loopback connection. `revision` is the revision of the compiled policy
    `rule` was taken from: the one the tier decides this connection's requests with, which its records name."""

    sandbox: str
    host: str
    port: int
    entry: str
    rule: InspectRule
    src_addr: str = ""
    src_port: int = 0
    orig_dst_addr: str = ""
    orig_dst_port: int = 0
    revision: str | None = None

    def encode(self) -> str:
        """One word (URL-safe base64 of JSON) for the hand-over line."""
        body = {"sandbox": self.sandbox, "host": self.host, "port": self.port, "entry": self.entry}
        body["rule"] = self.rule.to_dict()
        body["src"] = [self.src_addr, self.src_port]
        body["orig_dst"] = [self.orig_dst_addr, self.orig_dst_port]
        body["revision"] = self.revision
        return base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode()

    @classmethod
    def decode(cls, token: str) -> InspectionContext:
        """The inverse of `encode`; ValueError (or KeyError/TypeError) for anything the engine did not write."""
        data = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        (src_addr, src_port), (orig_addr, orig_port) = data["src"], data["orig_dst"]
        revision = data["revision"]
        if revision is not None and not (isinstance(revision, str) and REVISION_PATTERN.fullmatch(revision)):
            raise ValueError("the context's revision is not a revision id")
        return cls(data["sandbox"], data["host"], int(data["port"]), data["entry"], InspectRule.from_dict(data["rule"]),
                   str(src_addr), int(src_port), str(orig_addr), int(orig_port), revision)  # fmt: skip


def handover_line(token: str, address: str, port: int, context: InspectionContext) -> bytes:
    """What the engine writes to the tier before the sandbox's first bytes: the per-run token, the vetted
    address and port the tier is to dial (an address literal: the tier does no DNS), and the context."""
    return f"{HANDOVER_VERSION} {token} {address} {port} {context.encode()}\n".encode("ascii")


def parse_handover(line: bytes, token: str) -> tuple[str, int, InspectionContext]:
    """The inverse of `handover_line` for the tier: (address, port, context). ValueError, saying what is wrong,
    for a line the engine did not write with `token` (the token compared in constant time)."""
    words = line.rstrip(b"\n").split(b" ")
    if len(words) != 5 or words[0] != HANDOVER_VERSION.encode():
        raise ValueError(f"not a {HANDOVER_VERSION} line")
    if not token or not hmac.compare_digest(words[1], token.encode()):
        raise ValueError("the hand-over token is wrong")
    address = str(ipaddress.ip_address(words[2].decode("ascii")))  # never a name to resolve
    port = int(words[3])
    try:
        context = InspectionContext.decode(words[4].decode("ascii"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the hand-over's context is not the engine's: {exc!r}") from None
    if port != context.port:
        raise ValueError(f"the hand-over's port {port} is not the context's {context.port}")
    return address, port, context


@dataclass(frozen=True, slots=True)
class RequestVerdict:
    allowed: bool
    reason: str
    #: Which condition decided: "method", "path", "header <name>", or "" when the request is allowed.
    failed: str = ""


def _path_matches(pattern: str, path: str) -> bool:
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    return path == pattern or path.startswith(pattern.rstrip("/") + "/")


def _header_matches(match: HeaderMatch, values: list[str]) -> bool:
    if match.absent:
        return not values
    if not values:
        return False
    if match.equals is not None:
        return all(value == match.equals for value in values)
    prefix = match.prefix or ""
    return all(value.startswith(prefix) for value in values)


def decide_request(rule: InspectRule, method: str, path: str, headers: list[tuple[str, str]]) -> RequestVerdict:
    """Whether `rule` allows one request. Pure. `path` excludes the query; header names in any case.

    The denial's reason is the operator's `deny_reason` when the entry has one."""

    def denied(what: str, failed: str) -> RequestVerdict:
        return RequestVerdict(False, rule.deny_reason or what, failed)

    if method == "TRACE":
        return denied("TRACE is refused on inspected hosts (it echoes request headers back)", "method")
    if rule.methods and method not in rule.methods:
        return denied(f"method {method} not allowed (allowed: {', '.join(rule.methods)})", "method")
    if rule.paths and not any(_path_matches(pattern, path) for pattern in rule.paths):
        return denied(f"path {path} not allowed", "path")
    for match in rule.headers:
        values = [value for name, value in headers if name.lower() == match.name]
        if not _header_matches(match, values):
            return denied(f"header {match.name} does not match", f"header {match.name}")
    return RequestVerdict(True, "request allowed by the entry's HTTP rules")
