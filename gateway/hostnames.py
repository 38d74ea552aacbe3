"""Hostname patterns: validation and normalisation (pure, no I/O).

A pattern is an exact hostname (`api.example.com`) or a first-level wildcard
(`*.example.com`, which matches exactly one extra label: `a.example.com`, not
`example.com` and not `a.b.example.com`). The rules are the seeds' API-edge rules:
no scheme, no path, no `**`, no mid-label wildcard, RFC 1035 labels of 1-63
characters. Internationalised names are stored as punycode (IDNA 2008 / UTS 46,
via the `idna` package, which the standard library's IDNA 2003 codec is not), and a
trailing dot is folded.

A host entry (`allow_hosts`, `deny_hosts`) is a pattern, optionally with one port: `api.example.com:8443`
names that host on that port only. Its canonical form is the pattern's, then `:port` in plain decimal.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import TYPE_CHECKING

import idna

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

MAX_HOSTNAME_LENGTH = 253
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# The common case (plain lowercase ASCII, two or more labels, no punycode) in one regex: loading
# thousands of policies spends most of its time here, and the full checks below give the same answer.
_PLAIN_NAME = re.compile(r"(?:\*\.)?(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _invalid(value: str, why: str) -> GatewayError:
    return GatewayError("INVALID_HOSTNAME", f"{value!r} {why}")


def _to_ascii_label(label: str, original: str) -> str:
    if label.isascii():
        label = label.lower()
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError as exc:
                raise _invalid(original, f"has an invalid punycode label {label!r} ({exc})") from None
        return label
    try:
        return idna.encode(label, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise _invalid(original, f"has a label that is not a valid internationalised name ({exc})") from None


def normalize_pattern(value: object) -> str:
    """Validate a hostname or `*.` pattern and return its canonical form.

    Raises GatewayError(INVALID_HOSTNAME) naming exactly what is wrong.
    """
    if not isinstance(value, str):
        raise GatewayError("INVALID_HOSTNAME", f"expected a hostname string, got {type(value).__name__}")
    if value.isascii():
        plain = value.lower().removesuffix(".")
        if (
            len(plain) <= MAX_HOSTNAME_LENGTH
            and "xn--" not in plain
            and _PLAIN_NAME.fullmatch(plain)
            and not plain.rpartition(".")[2].isdigit()
        ):
            return plain
    original = value
    if not value:
        raise _invalid(original, "is empty; give a hostname such as api.example.com")
    if "://" in value:
        raise _invalid(original, "is a URL; give a hostname such as api.example.com")
    if any(ch.isspace() for ch in value):
        raise _invalid(original, "contains whitespace")
    if "/" in value or "?" in value or "#" in value:
        raise _invalid(original, "contains a path; give only the hostname")
    if "@" in value:
        raise _invalid(original, "contains user information; give only the hostname")
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        pass
    else:
        raise _invalid(original, "is an IP address; put addresses in allow_cidrs / deny_cidrs")
    if ":" in value:
        raise _invalid(original, "contains a port; give only the hostname (ports are separate rules)")
    if value.endswith("."):
        value = value[:-1]
    labels = value.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
        if not labels or labels == [""]:
            raise _invalid(original, "matches every host; use the unrestricted profile instead")
    for label in labels:
        if "*" in label:
            if label.startswith("**") or (wildcard and label == "*"):
                raise _invalid(original, "uses a double wildcard; only a first-level '*.' is allowed")
            raise _invalid(original, "has a wildcard inside a name; only a leading '*.' label is allowed")
    if "**" in original:
        raise _invalid(original, "uses a double wildcard; only a first-level '*.' is allowed")
    ascii_labels: list[str] = []
    for label in labels:
        if not label:
            raise _invalid(original, "has an empty label (two dots in a row, or a leading dot)")
        ascii_label = _to_ascii_label(label, original)
        if len(ascii_label) > 63:
            raise _invalid(original, f"has a label longer than 63 characters ({ascii_label[:20]}...)")
        if not _LABEL.match(ascii_label):
            raise _invalid(
                original,
                f"has an invalid label {ascii_label!r}: labels use letters, digits and inner hyphens (RFC 1035)",
            )
        ascii_labels.append(ascii_label)
    if ascii_labels[-1].isdigit():
        raise _invalid(original, "ends in an all-numeric label, which no top-level domain is")
    if wildcard and len(ascii_labels) < 2:
        raise _invalid(original, "wildcards a whole top-level domain; give at least *.name.tld")
    name = ".".join(ascii_labels)
    if len(name) + (2 if wildcard else 0) > MAX_HOSTNAME_LENGTH:
        raise _invalid(original, f"is longer than {MAX_HOSTNAME_LENGTH} characters")
    return ("*." if wildcard else "") + name


#: What makes `x:y` something other than host:port (a URL, a path, user information, whitespace).
_NOT_HOST_PORT = re.compile(r"://|[/?#@\s]")
#: A port in a host entry: plain ASCII decimal, no sign, no leading zero (`str.isdigit` would take `٤٤٣`).
_ENTRY_PORT = re.compile(r"[1-9][0-9]{0,4}")


def normalize_host_entry(value: object) -> str:
    """Validate a host entry (a pattern, or `pattern:port`) and return its canonical form.

    Raises GatewayError: INVALID_HOSTNAME for the name (a URL, an IPv6 literal, ...), INVALID_PORT for the port.
    """
    if not isinstance(value, str) or ":" not in value or _NOT_HOST_PORT.search(value):
        return normalize_pattern(value)  # a bare pattern; or its errors name a non-string, a URL, a path, a space
    if value.startswith("[") or is_ip_literal(value):
        raise _invalid(value, "is an IP address; put addresses in allow_cidrs / deny_cidrs")
    host, _, port = value.rpartition(":")
    if ":" in host:
        if is_ip_literal(host):
            raise _invalid(value, "is an IP address; put addresses in allow_cidrs / deny_cidrs")
        raise _invalid(value, "has more than one ':'; give host or host:port")
    if not host:
        raise _invalid(value, "has a port but no hostname")
    if not port:
        raise GatewayError("INVALID_PORT", f"{value!r} has a ':' but no port; give host:port (1-65535) or only host")
    if not _ENTRY_PORT.fullmatch(port) or int(port) > 65535:
        raise GatewayError("INVALID_PORT", f"{value!r}: {port[:20]!r} is not a port in 1-65535 (plain decimal)")
    return f"{normalize_pattern(host)}:{port}"


def split_host_entry(entry: str) -> tuple[str, int | None]:
    """A canonical host entry as (pattern, port or None for a bare pattern)."""
    pattern, _, port = entry.partition(":")
    return pattern, int(port) if port else None


def normalize_query_name(name: str) -> str:
    """The form a name takes when it is looked up (SNI, Host, DNS question): lowercased, no trailing dot.

    Cheap on purpose: it runs per connection. Names that are not valid simply match nothing.
    """
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


# The grammar of a name a connection or question carries (SNI, Host): looser than a pattern's (`_` is
# allowed, as resolvers allow it), but never an IP literal in disguise.
_HOSTNAME = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*\Z")
# Labels getaddrinfo/inet_aton would read as numbers (decimal, octal or hex): a name made
# only of such labels, or ending in an all-digit label, is an IP literal in disguise
# (`2130706433`, `0x7f.1`, `127.1`, `1.2.3.4`) and would "resolve" without DNS.
_NUMERIC_NAME = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)(?:\.(?:[0-9]+|0x[0-9a-f]*))*\Z")


def hostname_problem(name: str) -> str | None:
    """Why a lower-cased, trailing-dot-stripped name is not a DNS host name (None if it is).

    Cheap on the success path (two regex matches): it runs per connection.
    """
    if not name:
        return "is empty"
    if len(name) > MAX_HOSTNAME_LENGTH:
        return f"is longer than {MAX_HOSTNAME_LENGTH} characters"
    if _HOSTNAME.match(name) is None:
        if ":" in name and is_ip_literal(name):
            return "is an IP address literal"
        return "is not a DNS host name (letters, digits, '-', '_' in dot-separated labels of 1-63 characters)"
    if _NUMERIC_NAME.match(name) is not None or name.rpartition(".")[2].isdigit():
        return "is an IP address literal" if is_ip_literal(name) else "is a numeric IP address form, not a host name"
    return None


def is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@functools.cache
def _public_suffix_list() -> PublicSuffixList:
    from publicsuffixlist import PublicSuffixList  # parsing the list takes ~50 ms: only when asked

    return PublicSuffixList()


def is_public_suffix(name: str) -> bool:
    """Whether names one label below `name` belong to different registrants: `name` is on the Public Suffix List
    bundled with the `publicsuffixlist` package (offline; its private section too: `github.io`, `s3.amazonaws.com`,
    `cloudfront.net`), or a top-level domain it does not know (the list's default rule, as browsers apply it)."""
    return bool(_public_suffix_list().is_public(name))
