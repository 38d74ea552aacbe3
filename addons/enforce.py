"""The inspection tier's decisions about one request and one response, pure (the mitmproxy shell that applies
them is `addons/inspect.py`).

Order, for every request on a handed-over connection (`decide` below):
1. framing: shapes one hop could read differently from the next are refused (400) before any policy decision.
   mitmproxy itself refuses (with `validate_inbound_headers`, which the addon requires) CL+TE, two
   Content-Lengths (also as a list), a signed length, two Transfer-Encodings, an unknown coding or chunked
   not last, bad chunk sizes, a space before the colon, and (its h2 layer, with a GOAWAY) HTTP/2
   connection-specific headers (tests/integration/test_inspect_addon.py shows each). What it lets through is
   refused here: obs-fold (mitmproxy joins a folded line into one value with a CRLF inside and would forward
   it), CR/LF/NUL in any value, two Host headers; and HTTP/2 or 3 connection-specific headers once more, as
   this module's own rule rather than a library's.
2. the target: Host, the HTTP/2 `:authority` and an absolute-form authority must all name the connection's
   host (the one the engine checked: the TLS SNI, which the shell compares too), port optional: else 421.
   This closes domain fronting inside TLS for marked hosts.
3. the path: dot segments, also percent-encoded or behind backslashes (`/repos/%2e%2e/admin`), are refused
   (400): an origin would resolve them past a path rule.
4. the entry's HTTP rules (`gateway.inspection.decide_request`; TRACE always refused): else 403.

Credentials (plain injection): the sandbox sends its requests without the secret (or with any placeholder);
every copy of a bound header the sandbox sent is removed, on HTTPS and plain HTTP alike, and over HTTPS only
the tier sets it from the gateway-held secret. A secret is bound to the entry's hosts: a redirect to another
host is a new request on another connection, with that host's entry (if any), so nothing is sent there.

Scrubbing: the responses of an entry with credentials (whole: the shell turns streaming off for them) have every
occurrence of its secrets (as sent, JSON-escaped and percent-encoded) replaced by `REDACTED`, in header values,
trailers, bodies and WebSocket messages, so an origin that echoes the request never shows the secret to the
sandbox. Requests of such an entry ask for `Accept-Encoding: identity`, so bodies arrive as text; a body the
tier cannot decode, or one larger than `MAX_SCRUB_BYTES`, is refused with 502 rather than passed on unread.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

from gateway.inspection import InspectionContext, decide_request

#: What replaces a secret in a response.
REDACTED: Final = "[REDACTED]"
#: Bodies (decoded) scrubbed at most; above this a response of an entry with credentials is refused.
MAX_SCRUB_BYTES: Final = 8 * 1024 * 1024
#: Shorter secrets are refused: scrubbing them would rewrite ordinary text, and they are guessable anyway.
MIN_SECRET_LENGTH: Final = 8
#: A record's path and reason are cut here, so that a record stays one atomic pipe write (PIPE_BUF: 4096 bytes).
MAX_RECORD_PATH: Final = 1024
MAX_RECORD_REASON: Final = 500

_CONNECTION_HEADERS: Final = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
_BAD_VALUE_BYTES: Final = re.compile(rb"[\r\n\x00]")
_DOT_SEGMENT: Final = re.compile(r"(?:^|/)\.{1,2}(?:/|$)")


@dataclass(frozen=True, slots=True)
class Decision:
    """What the shell does with a request: pass it on (status 0) or answer `status` with `reason`."""

    status: int
    reason: str
    #: Which check decided ("framing", "target", "path", "method", "header <name>", ...; "" when allowed).
    failed: str = ""

    @property
    def allowed(self) -> bool:
        return self.status == 0


ALLOWED: Final = Decision(0, "request allowed by the entry's HTTP rules")


def _same_name(given: str, host: str) -> bool:
    given = given.lower()
    return (given[:-1] if given.endswith(".") else given) == host.lower()


def names_host(authority: str, host: str, port: int) -> bool:
    """Whether a Host / :authority value is `host` (any case, one trailing dot) with no port or with `port`."""
    value = authority.strip()
    name, colon, digits = value.rpartition(":")
    if not colon:
        name = value
    elif not (digits.isascii() and digits.isdigit()) or int(digits) != port:
        return False
    return "@" not in name and _same_name(name, host)


def names_sni(sni: str | None, host: str) -> bool:
    """Whether a ClientHello's SNI is the connection's host (no SNI never is)."""
    return sni is not None and _same_name(sni, host)


def framing_fault(http_version: str, fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a request's header block is a smuggling shape mitmproxy lets through, or None (see the module doc)."""
    hosts = 0
    multiplexed = http_version.startswith(("HTTP/2", "HTTP/3"))
    for raw_name, value in fields:
        name = raw_name.decode("latin-1").lower()
        if _BAD_VALUE_BYTES.search(value):
            return f"header {name} has a line break or NUL in its value (obs-fold is refused)"
        if name == "host":
            hosts += 1
        if multiplexed and (name in _CONNECTION_HEADERS or (name == "te" and value.strip().lower() != b"trailers")):
            return f"connection-specific header {name} in an {http_version} request"
    if hosts > 1:
        return "more than one Host header"
    return None


def target_fault(authority: str, hosts: Sequence[str], host: str, port: int) -> str | None:
    """Why a request does not name the connection's host (421), or None. `authority`: the HTTP/2 :authority or
    an HTTP/1 absolute-form authority ("" when there is none); `hosts`: the Host header values."""
    named = [authority, *hosts] if authority else list(hosts)
    if not named:
        return f"the request names no host (this connection is for {host})"
    for value in named:
        if not names_host(value, host, port):
            return f"the request names {value[:100]!r} but this connection is for {host} (TLS SNI)"
    return None


def request_path(target: str) -> str:
    """The path of a request target, without the query (and fragment)."""
    return target.split("?", 1)[0].split("#", 1)[0]


def path_fault(path: str, method: str) -> str | None:
    """Why a request path could be read past the entry's path rules (400), or None."""
    if path == "*" and method == "OPTIONS":
        return None
    if not path.startswith("/"):
        return f"request path {path[:100]!r} does not start with /"
    decoded = path
    for _ in range(3):  # %252e decodes to %2e, then to .: an origin may decode more than once
        decoded = unquote(decoded)
    if _DOT_SEGMENT.search(decoded.replace("\\", "/")):
        return "request path has a dot segment (. or ..), refused on inspected hosts"
    return None


def decide(
    context: InspectionContext,
    *,
    http_version: str,
    method: str,
    target: str,
    authority: str,
    fields: Sequence[tuple[bytes, bytes]],
) -> Decision:
    """The decision about one request of a handed-over connection (see the module doc for the order)."""
    fault = framing_fault(http_version, fields)
    if fault is not None:
        return Decision(400, fault, "framing")
    text = [(name.decode("latin-1"), value.decode("utf-8", "replace")) for name, value in fields]
    hosts = [value for name, value in text if name.lower() == "host"]
    fault = target_fault(authority, hosts, context.host, context.port)
    if fault is not None:
        return Decision(421, fault, "target")
    path = request_path(target)
    fault = path_fault(path, method)
    if fault is not None:
        return Decision(400, fault, "path")
    verdict = decide_request(context.rule, method, path, text)
    return ALLOWED if verdict.allowed else Decision(403, verdict.reason, verdict.failed)


def credential_headers(context: InspectionContext, secrets: Mapping[str, str]) -> list[tuple[str, str]] | None:
    """(header, value) for each credential of the connection's entry; None when a secret it names is not
    configured in the tier (the request is then refused: sending it without its credential helps nobody)."""
    out = []
    for credential in context.rule.credentials:
        value = secrets.get(credential.secret)
        if value is None:
            return None
        out.append((credential.header, credential.template.replace("{secret}", value)))
    return out


class Scrubber:
    """Replaces the given secrets in response text and bytes. Longer forms first, in one pass, so a form that
    contains another is replaced whole."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = set()
        for secret in secrets:
            forms |= {secret, json.dumps(secret)[1:-1], quote(secret, safe="")}
        ordered = sorted(forms, key=len, reverse=True)
        self._text = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._bytes = re.compile(b"|".join(re.escape(f.encode()) for f in ordered)) if ordered else None

    def __bool__(self) -> bool:
        return self._text is not None

    def text(self, value: str) -> str:
        return value if self._text is None else self._text.sub(REDACTED, value)

    def data(self, value: bytes) -> bytes:
        return value if self._bytes is None else self._bytes.sub(REDACTED.encode(), value)


def scrubber_for(context: InspectionContext, secrets: Mapping[str, str]) -> Scrubber:
    """The scrubber for the responses of a connection: its entry's secrets (none: a no-op)."""
    return Scrubber(secrets[c.secret] for c in context.rule.credentials if c.secret in secrets)


def parse_secrets(text: str) -> dict[str, str]:
    """The tier's secrets file: one JSON object {name: value}. ValueError with a message naming the entry."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the secrets file must hold one JSON object {name: value}")
    for name, value in data.items():
        if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
            raise ValueError(f"secret {name!r}: the value must be a string of at least {MIN_SECRET_LENGTH} characters")
        if _BAD_VALUE_BYTES.search(value.encode()):
            raise ValueError(f"secret {name!r}: the value has a line break or NUL (it goes into a header)")
    return data
