"""The policy model: sandbox and template records, parsed and validated from plain data.

One parser serves every entry point (API, policy file, Redis), so a record is
accepted or refused the same way wherever it comes from. Parsing is strict:
unknown fields, wrong types, out-of-range numbers and malformed names are refused
with the field path and the reason; nothing is silently dropped or coerced.

Each record's accepted fields are declared once, as JSON Schema tables (`EGRESS_SCHEMA`,
`SANDBOX_SCHEMA`, ...): the parser refuses any field not in its table, and the OpenAPI document
publishes the same tables, built from the same limits and enums the parser checks.

Fields left unset (`None`) inherit from the sandbox's template and then from the
profile's defaults; see `gateway.decision.compile_policy` for the merge.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, TypeVar

from gateway.errors import GatewayError
from gateway.hostnames import MAX_HOSTNAME_LENGTH, normalize_host_entry, normalize_pattern
from gateway.inspection import DEFAULT_INSPECT_PORTS, HTTP_METHODS, Credential, HeaderMatch, InspectRule
from gateway.rules import Rule

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROFILES = ("isolated", "registry", "allowlisted", "unrestricted")
DEFAULT_PROFILE = "isolated"
UNSUPPORTED_PROFILES = {
    "transit": "the transit profile (L2 attachment to tenant bridges) is not supported by this gateway; "
    "it filters at L3/L4 and above. Use allowlisted or unrestricted.",
}
EGRESS_MODES = ("allow_all", "deny_all")
#: `egress.enforcement`: `report` lets what the allowlist would deny pass, recorded as would_deny (see
#: `gateway.rules.Rule.reportable` for what stays enforced); `enforce`, the default, denies it.
ENFORCEMENT_MODES = ("enforce", "report")
#: L4 protocols a private link may open; one link opens one (list the link twice for both).
LINK_PROTOCOLS = ("tcp", "udp")
MAX_LIST_ENTRIES = 50
MAX_ADDRESSES = 8
METADATA_RANGE = ipaddress.ip_network("169.254.0.0/16")
#: The destinations the data plane refuses whatever a policy or `public_ranges` say (gateway/destinations.py),
#: so an allow_cidrs entry inside one is refused. Sources: each cloud's instance-metadata documentation.
METADATA_ENDPOINTS: tuple[tuple[str, str], ...] = (
    (str(METADATA_RANGE), "link-local address (cloud metadata services live here)"),
    ("169.254.169.254/32", "cloud metadata service (AWS, GCP, Azure, OCI, OpenStack, DigitalOcean)"),
    ("169.254.170.2/32", "cloud metadata service (AWS ECS task metadata)"),
    ("169.254.170.23/32", "cloud metadata service (AWS EKS Pod Identity)"),
    ("169.254.0.23/32", "cloud metadata service (Tencent Cloud)"),
    ("100.100.100.200/32", "cloud metadata service (Alibaba Cloud)"),
    ("168.63.129.16/32", "cloud host agent (Azure WireServer)"),
    ("192.0.0.192/32", "cloud metadata service (Oracle Cloud)"),
    ("fd00:ec2::254/128", "cloud metadata service (AWS IMDS over IPv6)"),
    ("fd00:ec2::23/128", "cloud metadata service (AWS EKS Pod Identity over IPv6)"),
    ("fd20:ce::254/128", "cloud metadata service (Google Cloud over IPv6)"),
)
_METADATA_NETS = tuple(ipaddress.ip_network(text) for text, _ in METADATA_ENDPOINTS)
ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62})$")
MAX_DESCRIPTION = 500
#: An operator's message to a sandbox: sent in a 403's header and body and a DNS answer's EDE text.
MAX_DENY_MESSAGE = 200
#: A deny_messages key: a rule, or a rule and the entry it names (`deny_hosts *.tracker.example`).
MAX_MESSAGE_KEY = 300
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 253

#: Inspect entries (`egress.inspect`): the bounds of their HTTP rules and credential bindings.
MAX_PATH_PATTERN = 256
MAX_HEADER_VALUE = 1024
MAX_SECRET_NAME = 63
#: A header field name (RFC 9110 `token`); stored lower-case, as HTTP/2 sends them.
HTTP_TOKEN_PATTERN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Headers a credential may not bind: hop-by-hop and proxy headers (not forwarded, or the tier's own), and the
#: ones that route or frame the request (binding them would let a secret redirect or desynchronise it).
CREDENTIAL_FORBIDDEN_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
#: A key in an inspect entry or a credential that reads as the secret itself: refused with its own code (a
#: policy names secrets; their values live in the gateway's config), and its value is never echoed.
SECRET_VALUE_KEY = re.compile(r"value|token|passw|api_?key|bearer|credential_?data", re.IGNORECASE)
#: Visible ASCII and space: what paths, reasons and templates may contain (they end up in HTTP heads).
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
#: A header value to match: visible ASCII, space and tab (RFC 9110 field-vchar without obs-text).
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")

#: Ranges for limits: (minimum, maximum). Bandwidth: 1-10000 Mbit/s (scaibunker's range).
LIMIT_RANGES: Mapping[str, tuple[int, int]] = {
    "connections_per_minute": (1, 1_000_000),
    "bandwidth_mbit": (1, 10_000),
    "burst_mbit": (1, 10_000),
    "dns_queries_per_minute": (1, 1_000_000),
}


def _fail(code: str, message: str, path: str) -> GatewayError:
    return GatewayError(code, message, path)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _expect_mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail("INVALID_TYPE", f"expected an object, got {_type_name(value)}", path)
    return value


def _check_known(data: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    allowed = set(allowed)
    for key in data:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise _fail("UNKNOWN_FIELD", f"unknown field {key!r}; expected one of {', '.join(sorted(allowed))}", where)


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail("INVALID_TYPE", f"expected true or false, got {_type_name(value)}", path)
    return value


def _int(value: object, path: str, low: int, high: int, code: str = "OUT_OF_RANGE") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail("INVALID_TYPE", f"expected an integer, got {_type_name(value)}", path)
    if not low <= value <= high:
        raise _fail(code, f"{value} is outside {low}-{high}", path)
    return value


def _port(value: object, path: str) -> int:
    return _int(value, path, 1, 65535, code="INVALID_PORT")


T = TypeVar("T")


def _list[T](
    value: object, path: str, item: Callable[[object, str], T], *, limit: int = MAX_LIST_ENTRIES
) -> tuple[T, ...]:
    if not isinstance(value, list | tuple):
        raise _fail("INVALID_TYPE", f"expected a list, got {_type_name(value)}", path)
    if len(value) > limit:
        raise _fail("TOO_MANY_ENTRIES", f"{len(value)} entries; at most {limit} are allowed", path)
    out: list[T] = []
    for index, entry in enumerate(value):
        out.append(item(entry, f"{path}[{index}]"))
    return tuple(dict.fromkeys(out))  # duplicates are harmless; keep first-seen order


def _hostname(value: object, path: str) -> str:
    try:
        return normalize_pattern(value)
    except GatewayError as exc:
        raise _fail(exc.code, exc.message, path) from None


def _host_entry(value: object, path: str) -> str:
    try:
        return normalize_host_entry(value)
    except GatewayError as exc:
        raise _fail(exc.code, exc.message, path) from None


def _network(value: object, path: str) -> IPNetwork:
    if not isinstance(value, str):
        raise _fail("INVALID_CIDR", f"expected a CIDR string such as 10.0.0.0/8, got {_type_name(value)}", path)
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise _fail("INVALID_CIDR", f"{value!r} is not a CIDR ({exc})", path) from None
        raise _fail("INVALID_CIDR", f"{value!r} has host bits set; did you mean {loose}?", path) from None


def _address(value: object, path: str) -> IPAddress:
    if not isinstance(value, str):
        raise _fail("INVALID_ADDRESS", f"expected an IP address string, got {_type_name(value)}", path)
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise _fail("INVALID_ADDRESS", f"{value!r} is not an IPv4 or IPv6 address", path) from None


def _identifier(value: object, path: str, what: str = "id") -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):  # fullmatch: `$` also matches before a final \n
        raise _fail(
            "INVALID_ID",
            f"{value!r} is not a valid {what}: 1-63 characters, lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit",
            path,
        )
    return value


def _text(value: object, path: str, limit: int = MAX_DESCRIPTION) -> str:
    if not isinstance(value, str):
        raise _fail("INVALID_TYPE", f"expected a string, got {_type_name(value)}", path)
    if len(value) > limit:
        raise _fail("TOO_LONG", f"at most {limit} characters", path)
    return value


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Egress:
    """Outbound rules. `None` means "not set here": inherit (template, then profile default)."""

    mode: str | None = None
    allow_internet: bool | None = None
    #: Host entries (`api.example.com`, `*.example.com`, `api.example.com:8443`), canonical.
    allow_hosts: tuple[str, ...] | None = None
    #: Host entries refused in every profile that looks at names, before any allow rule; a template's and a
    #: sandbox's lists are unioned (a sandbox cannot lift its template's denials).
    deny_hosts: tuple[str, ...] | None = None
    presets: tuple[str, ...] | None = None
    allow_cidrs: tuple[IPNetwork, ...] | None = None
    deny_cidrs: tuple[IPNetwork, ...] | None = None
    allow_ports: tuple[int, ...] | None = None
    host_ports: tuple[int, ...] | None = None
    #: Allow entries whose HTTP requests the inspection tier decides; they win over allow_hosts and presets.
    inspect: tuple[InspectRule, ...] | None = None
    #: Outer (public) names whose Encrypted Client Hello is accepted; any other ECH hello is refused.
    allow_ech: tuple[str, ...] | None = None
    #: `report`: the allowlist's denials pass and are recorded as would_deny (rolling out a narrower policy).
    enforcement: str | None = None
    #: The operator's message per denying rule (`default:deny`, `deny_hosts *.tracker.example`), told the sandbox.
    deny_messages: Mapping[str, str] | None = None

    def set_fields(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def merged_over(self, base: Egress) -> Egress:
        """This record's set fields over `base` (a template's); the fields in UNIONED_EGRESS_FIELDS add to base's."""
        own = {name: getattr(self, name) for name in self.set_fields()}
        for name in UNIONED_EGRESS_FIELDS:
            if name in own and getattr(base, name):
                own[name] = tuple(dict.fromkeys((*getattr(base, name), *own[name])))
        if "deny_messages" in own and base.deny_messages:
            own["deny_messages"] = {**base.deny_messages, **own["deny_messages"]}  # per key, the sandbox's wins
        return replace(base, **own)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.set_fields():
            value = getattr(self, name)
            if name in ("allow_cidrs", "deny_cidrs"):
                value = [str(net) for net in value]
            elif name == "inspect":
                value = [rule.to_dict() for rule in value]
            elif name == "deny_messages":
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class Limits:
    connections_per_minute: int | None = None
    bandwidth_mbit: int | None = None
    burst_mbit: int | None = None
    dns_queries_per_minute: int | None = None

    def merged_over(self, base: Limits) -> Limits:
        own = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(base, **{name: value for name, value in own.items() if value is not None})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True, slots=True)
class Ingress:
    sources: tuple[IPNetwork, ...] = ()
    ports: tuple[int, ...] = ()
    public_access: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": [str(n) for n in self.sources],
            "ports": list(self.ports),
            "public_access": self.public_access,
        }


@dataclass(frozen=True, slots=True)
class PrivateLink:
    """`source` may open `protocol` connections to the sandbox that carries this link (one direction)."""

    source: str
    ports: tuple[int, ...] = ()  # empty: any port
    protocol: str = "tcp"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "ports": list(self.ports), "protocol": self.protocol}


@dataclass(frozen=True, slots=True)
class Sandbox:
    id: str
    addresses: tuple[IPAddress, ...]
    profile: str = DEFAULT_PROFILE
    template: str | None = None
    egress: Egress = field(default_factory=Egress)
    ingress: Ingress = field(default_factory=Ingress)
    limits: Limits = field(default_factory=Limits)
    private_links: tuple[PrivateLink, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "addresses": [str(a) for a in self.addresses],
            "profile": self.profile,
            "template": self.template,
            "egress": self.egress.to_dict(),
            "ingress": self.ingress.to_dict(),
            "limits": self.limits.to_dict(),
            "private_links": [link.to_dict() for link in self.private_links],
            "labels": dict(self.labels),
        }


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    description: str = ""
    egress: Egress = field(default_factory=Egress)
    limits: Limits = field(default_factory=Limits)
    #: Sandboxes naming this template stay within it (gateway.invariants).
    ceiling: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "ceiling": self.ceiling,
            "egress": self.egress.to_dict(),
            "limits": self.limits.to_dict(),
        }


# --------------------------------------------------------------------------- parsing

# --------------------------------------------------------------------------- accepted fields, as JSON Schema
# Each record's accepted fields are declared once, here: the parser refuses any name not in these tables, and
# the OpenAPI document (gateway.openapi) publishes them as the request schemas. Types, limits and enums come
# from the constants the parser checks against, so the published schema cannot be looser than the parser.

PORT_SCHEMA: Final[Mapping[str, Any]] = {"type": "integer", "minimum": 1, "maximum": 65535}
HOSTNAME_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "string",
    "maxLength": MAX_HOSTNAME_LENGTH,
    "description": "An exact hostname (api.example.com) or a first-level wildcard (*.example.com, which matches "
    "exactly one extra label). No scheme, path, port, `**` or mid-label `*`; labels are 1-63 RFC 1035 "
    "characters; internationalised names are stored as punycode.",
}
HOST_ENTRY_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "string",
    "maxLength": MAX_HOSTNAME_LENGTH + len(":65535"),
    "description": "A hostname as above (api.example.com, *.example.com), optionally with one port: "
    "api.example.com:8443 names that host on port 8443 only. The port is plain decimal 1-65535; no scheme, path, "
    "IP address or IPv6 literal.",
}
CIDR_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "string",
    "description": "A network in CIDR notation with no host bits set (10.0.0.0/8).",
}
ADDRESS_SCHEMA: Final[Mapping[str, Any]] = {"type": "string", "description": "An IPv4 or IPv6 address."}
ID_SCHEMA: Final[Mapping[str, Any]] = {"type": "string", "pattern": ID_PATTERN.pattern}


def schema_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The schema, or null (the parser treats null as 'not set', e.g. to inherit from the template)."""
    return {"anyOf": [schema, {"type": "null"}]}


def list_schema(item: Mapping[str, Any], description: str, limit: int = MAX_LIST_ENTRIES) -> dict[str, Any]:
    return {"type": "array", "items": item, "maxItems": limit, "description": description}


EGRESS_SCHEMA: Final[Mapping[str, Any]] = {
    "mode": nullable({"type": "string", "enum": list(EGRESS_MODES)}),
    "allow_internet": nullable({"type": "boolean"}),
    "allow_hosts": nullable(
        list_schema(
            HOST_ENTRY_SCHEMA,
            "Hostnames the sandbox may reach (TLS SNI / HTTP Host): a bare name on host_ports (default: any "
            "port), a host:port entry on its port only.",
        )
    ),
    "deny_hosts": nullable(
        list_schema(
            HOST_ENTRY_SCHEMA,
            "Hostnames refused (TLS SNI, HTTP Host, DNS: NXDOMAIN) whatever allows them: allow_hosts, presets, "
            "inspect and the unrestricted profile. A host:port entry refuses that port only (DNS still resolves "
            "the name). Unioned with the template's list. Enforced also in report mode.",
        )
    ),
    "presets": nullable(list_schema({"type": "string"}, "Names of presets (GET /v1/presets) to include.")),
    "allow_cidrs": nullable(list_schema(CIDR_SCHEMA, "Destinations allowed by address (deny_all mode).")),
    "deny_cidrs": nullable(
        list_schema(CIDR_SCHEMA, "Destinations refused by address; evaluated before every allow rule.")
    ),
    "allow_ports": nullable(list_schema(PORT_SCHEMA, "Restrict allow_cidrs to these ports; needs allow_cidrs.")),
    "host_ports": nullable(list_schema(PORT_SCHEMA, "Restrict allow_hosts to these ports (default: any).")),
    "inspect": nullable(
        list_schema(
            schema_ref("InspectEntry"),
            "Allow entries whose HTTP requests the inspection tier decides (methods, paths, headers) and to "
            "which it adds gateway-held credentials. They win over allow_hosts and presets for their names and "
            "ports; a host may appear in one entry only.",
        )
    ),
    "allow_ech": nullable(
        list_schema(
            HOSTNAME_SCHEMA,
            "Outer (public) TLS names whose Encrypted Client Hello is accepted. ECH hides the real destination "
            "behind the outer name (a CDN's ECH key serves every site it hosts), so every other ClientHello "
            "carrying ECH is refused; the outer name must still be allowed by the rest of the policy.",
        )
    ),
    "enforcement": nullable(
        {
            "type": "string",
            "enum": list(ENFORCEMENT_MODES),
            "default": "enforce",
            "description": "`report`: connections and DNS questions the allowlist would deny (a name, address or "
            "port not listed) pass and are recorded with verdict would_deny and the rule that would have denied "
            "them. The built-in guards (metadata, special and the gateway's own addresses, SMTP, ECH, malformed "
            "input), deny_cidrs, deny_hosts, allow_internet false and rate limits stay enforced. Profiles "
            "allowlisted and unrestricted.",
        }
    ),
    "deny_messages": nullable(
        {
            "type": "object",
            "maxProperties": MAX_LIST_ENTRIES,
            "propertyNames": {"type": "string", "maxLength": MAX_MESSAGE_KEY},
            "additionalProperties": {"type": "string", "minLength": 1, "maxLength": MAX_DENY_MESSAGE},
            "description": "The operator's message per denying rule, told the sandbox with each denial (a 403's "
            "X-Gateway-Message header and body, the DNS answer's Extended DNS Error text) and kept in the flow "
            "record. A key is a rule as records show it, alone (`default:deny`, `deny_hosts`, "
            "`builtin:metadata`) or with its entry (`deny_hosts *.tracker.example`), which wins. One line of "
            "visible ASCII. A sandbox's keys are added to its template's (the sandbox's text wins per key).",
            "examples": [{"default:deny": "Only package registries are reachable; ask #platform for more"}],
        }
    ),
}
HEADER_NAME_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "string",
    "pattern": f"^{HTTP_TOKEN_PATTERN.pattern}$",
    "description": "A header field name (RFC 9110 token); stored lower-case.",
}
HEADER_VALUE_SCHEMA: Final[Mapping[str, Any]] = {"type": "string", "maxLength": MAX_HEADER_VALUE}
HEADER_MATCH_SCHEMA: Final[Mapping[str, Any]] = {
    "name": HEADER_NAME_SCHEMA,
    "equals": {**HEADER_VALUE_SCHEMA, "description": "Every copy of the header has exactly this value."},
    "prefix": {**HEADER_VALUE_SCHEMA, "description": "Every copy of the header starts with this."},
    "absent": {"type": "boolean", "const": True, "description": "The request carries no such header."},
}
CREDENTIAL_SCHEMA: Final[Mapping[str, Any]] = {
    "header": {
        **HEADER_NAME_SCHEMA,
        "description": "The request header the secret is sent in (authorization, x-api-key, ...); whatever copy "
        "the sandbox sent is removed. Not hop-by-hop, host, content-length or transfer-encoding.",
    },
    "secret": {
        "type": "string",
        "maxLength": MAX_SECRET_NAME,
        "description": "The name of a secret configured in the gateway's [inspection] section (never its value).",
    },
    "template": {
        "type": "string",
        "maxLength": MAX_HEADER_VALUE,
        "default": "{secret}",
        "description": "The header's value, with `{secret}` (exactly once) replaced by the secret: `Bearer {secret}`.",
    },
}
INSPECT_SCHEMA: Final[Mapping[str, Any]] = {
    "hosts": {**list_schema(HOSTNAME_SCHEMA, "The names this entry allows and marks."), "minItems": 1},
    "ports": {
        **list_schema(PORT_SCHEMA, "The ports it allows and marks."),
        "minItems": 1,
        "default": list(DEFAULT_INSPECT_PORTS),
    },
    "methods": list_schema(
        {"type": "string", "enum": list(HTTP_METHODS)},
        "Allowed methods, upper-case (default: any; TRACE is always refused).",
    ),
    "paths": list_schema(
        {"type": "string", "pattern": "^/", "maxLength": MAX_PATH_PATTERN},
        "Allowed paths, query excluded (default: any). `/repos/*` is a prefix; `/user` matches /user and "
        "/user/..., never /username.",
    ),
    "headers": list_schema(
        schema_ref("HeaderMatch"), "Conditions on request headers: a name and exactly one of equals, prefix, absent."
    ),
    "deny_reason": {
        "type": "string",
        "maxLength": MAX_DESCRIPTION,
        "description": "What a refused request is told (printable ASCII); default: the failed condition.",
    },
    "credentials": list_schema(
        schema_ref("Credential"), "Headers the tier sets from gateway-held secrets (HTTPS only)."
    ),
}
LIMITS_SCHEMA: Final[Mapping[str, Any]] = {
    name: nullable({"type": "integer", "minimum": low, "maximum": high}) for name, (low, high) in LIMIT_RANGES.items()
}
INGRESS_SCHEMA: Final[Mapping[str, Any]] = {
    "sources": list_schema({"type": "string"}, "Source addresses or CIDRs allowed to connect in."),
    "ports": list_schema(PORT_SCHEMA, "Ports inside the sandbox that may be reached."),
    "public_access": {"type": "boolean"},
}
PRIVATE_LINK_SCHEMA: Final[Mapping[str, Any]] = {
    "source": ID_SCHEMA,
    "ports": list_schema(PORT_SCHEMA, "Ports allowed (empty: any)."),
    "protocol": {
        "type": "string",
        "enum": list(LINK_PROTOCOLS),
        "default": "tcp",
        "description": "The L4 protocol the link opens (one per link; list a link twice for both).",
    },
}
SANDBOX_SCHEMA: Final[Mapping[str, Any]] = {
    "id": {**ID_SCHEMA, "description": "1-63 characters: lowercase letters, digits, '-' and '_'."},
    "addresses": {
        "type": "array",
        "items": ADDRESS_SCHEMA,
        "minItems": 1,
        "maxItems": MAX_ADDRESSES,
        "description": "The sandbox's source addresses, inside the configured sandbox subnets; unique across "
        "sandboxes.",
    },
    "profile": {
        "type": "string",
        "enum": list(PROFILES),
        "default": DEFAULT_PROFILE,
        "description": "Set at creation, immutable afterwards. Each profile but isolated needs the caller's "
        f"scope network:<profile>. Not supported: {', '.join(UNSUPPORTED_PROFILES)}.",
    },
    "template": nullable({**ID_SCHEMA, "description": "A template whose egress and limits this sandbox inherits."}),
    "egress": {
        "description": "Own egress rules over the template's; a list is a shorthand mixing hostnames and CIDRs.",
        "anyOf": [
            schema_ref("Egress"),
            {"type": "array", "items": {"type": "string"}, "maxItems": MAX_LIST_ENTRIES},
            {"type": "null"},
        ],
    },
    "ingress": nullable(schema_ref("Ingress")),
    "limits": nullable(schema_ref("Limits")),
    "private_links": nullable(
        list_schema(
            {"anyOf": [ID_SCHEMA, schema_ref("PrivateLink")]}, "Sandboxes that may open connections to this one."
        )
    ),
    "labels": nullable(
        {
            "type": "object",
            "propertyNames": {"maxLength": MAX_LABEL_KEY},
            "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_VALUE},
            "maxProperties": MAX_LIST_ENTRIES,
        }
    ),
}
TEMPLATE_SCHEMA: Final[Mapping[str, Any]] = {
    "name": ID_SCHEMA,
    "description": {"type": "string", "maxLength": MAX_DESCRIPTION},
    "ceiling": {
        "type": "boolean",
        "description": "A ceiling: sandboxes naming this template cannot widen it (a record that does is refused; "
        "a connection passes only where the template alone allows it too).",
    },
    "egress": nullable(schema_ref("Egress")),
    "limits": nullable(schema_ref("Limits")),
}
EGRESS_FIELDS: Final = tuple(EGRESS_SCHEMA)
#: Egress fields a sandbox adds to its template's instead of replacing them: denials, which only narrow.
UNIONED_EGRESS_FIELDS: Final = ("deny_hosts",)
INSPECT_FIELDS: Final = tuple(INSPECT_SCHEMA)
SANDBOX_FIELDS: Final = tuple(SANDBOX_SCHEMA)
TEMPLATE_FIELDS: Final = tuple(TEMPLATE_SCHEMA)


# --------------------------------------------------------------------------- inspect entries


def _check_no_secret_values(data: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    """A key that reads as a secret value gets its own code (UNKNOWN_FIELD would only list the spellings), and a
    message that never repeats what was sent."""
    allowed = set(allowed)
    for key in data:
        if key not in allowed and isinstance(key, str) and SECRET_VALUE_KEY.search(key):
            raise _fail(
                "SECRET_VALUE_IN_POLICY",
                "a policy names a secret (credentials[].secret), never its value: configure the value in the "
                "gateway's [inspection] secrets and remove this field",
                f"{path}.{key}",
            )


def _string(value: object, path: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _fail("INVALID_TYPE", f"expected a string, got {_type_name(value)}", path)
    if len(value) > limit:
        raise _fail("TOO_LONG", f"{len(value)} characters; at most {limit}", path)
    return value


def _header_name(value: object, path: str) -> str:
    if not isinstance(value, str) or not HTTP_TOKEN_PATTERN.fullmatch(value):
        shown = repr(value) if isinstance(value, str) and len(value) <= 40 else "this"
        raise _fail(
            "INVALID_HEADER_NAME",
            f"{shown} is not a header name: letters, digits and !#$%&'*+-.^_`|~ (RFC 9110 token); "
            "no pseudo-headers (:authority)",
            path,
        )
    return value.lower()


def _method(value: object, path: str) -> str:
    if isinstance(value, str) and value in HTTP_METHODS:
        return value
    if value == "TRACE":
        hint = "TRACE is refused on inspected hosts whatever an entry says (it echoes request headers back)"
    elif isinstance(value, str) and value.upper() in HTTP_METHODS:
        hint = f"methods are upper-case: {value.upper()}"
    else:
        hint = f"use one of {', '.join(HTTP_METHODS)}"
    shown = repr(value) if isinstance(value, str) and len(value) <= 16 else "this"
    raise _fail("INVALID_METHOD", f"{shown} is not an allowed method; {hint}", path)


def _path_pattern(value: object, path: str) -> str:
    text = _string(value, path, MAX_PATH_PATTERN)
    if not text.startswith("/"):
        problem = "does not start with /"
    elif not _PRINTABLE.fullmatch(text) or " " in text:
        problem = "has a character other than visible ASCII (percent-encode it as the request would)"
    elif "?" in text or "#" in text:
        problem = "has a query or fragment (paths are matched without the query)"
    elif "*" in text[:-1]:
        problem = "has a * before its end (only a final * is allowed: /repos/*)"
    else:
        return text
    raise _fail("INVALID_PATH_PATTERN", f"the path pattern {problem}", path)


def _header_value(value: object, path: str, *, prefix: bool) -> str:
    text = _string(value, path, MAX_HEADER_VALUE)
    if not _FIELD_VALUE.fullmatch(text):
        raise _fail("INVALID_HEADER_VALUE", "a header value is visible ASCII, spaces and tabs (no CR, LF or NUL)", path)
    if text != text.lstrip(" \t") or (not prefix and text != text.rstrip(" \t")):
        raise _fail(
            "INVALID_HEADER_VALUE", "HTTP trims a value's surrounding whitespace, so this would never match", path
        )
    return text


def _header_match(value: object, path: str) -> HeaderMatch:
    data = _expect_mapping(value, path)
    _check_known(data, HEADER_MATCH_SCHEMA, path)
    if "name" not in data:
        raise _fail("MISSING_FIELD", "a header condition names its header", f"{path}.name")
    conditions = [key for key in ("equals", "prefix", "absent") if key in data]
    if len(conditions) != 1 or data.get("absent", True) is not True:
        if "absent" in data:
            _bool(data["absent"], f"{path}.absent")
        raise _fail(
            "HEADER_MATCH_AMBIGUOUS",
            "a header condition has exactly one of equals, prefix or absent: true"
            + (f" (got {', '.join(conditions)})" if conditions else ""),
            path,
        )
    return HeaderMatch(
        name=_header_name(data["name"], f"{path}.name"),
        equals=_header_value(data["equals"], f"{path}.equals", prefix=False) if "equals" in data else None,
        prefix=_header_value(data["prefix"], f"{path}.prefix", prefix=True) if "prefix" in data else None,
        absent="absent" in data,
    )


def _credential(value: object, path: str, known_secrets: frozenset[str]) -> Credential:
    data = _expect_mapping(value, path)
    _check_no_secret_values(data, CREDENTIAL_SCHEMA, path)
    _check_known(data, CREDENTIAL_SCHEMA, path)
    for required in ("header", "secret"):
        if required not in data:
            raise _fail("MISSING_FIELD", f"a credential names its {required}", f"{path}.{required}")
    raw_header = data["header"]
    if isinstance(raw_header, str) and raw_header.startswith(":"):
        raise _fail("INVALID_CREDENTIAL_HEADER", "a credential cannot bind a pseudo-header", f"{path}.header")
    header = _header_name(raw_header, f"{path}.header")
    if header in CREDENTIAL_FORBIDDEN_HEADERS:
        raise _fail(
            "INVALID_CREDENTIAL_HEADER",
            f"{header} routes, frames or is consumed by a proxy; bind a header the origin reads "
            "(authorization, x-api-key, ...)",
            f"{path}.header",
        )
    template = _string(data.get("template", "{secret}"), f"{path}.template", MAX_HEADER_VALUE)
    if template.count("{secret}") != 1 or not _FIELD_VALUE.fullmatch(template):
        raise _fail(
            "CREDENTIAL_TEMPLATE",
            "a template contains {secret} exactly once and otherwise visible ASCII, spaces and tabs "
            "(no CR or LF): Bearer {secret}",
            f"{path}.template",
        )
    # The secret's name is never echoed: a value pasted here by mistake must not reach an error answer or a log.
    secret = _string(data["secret"], f"{path}.secret", MAX_SECRET_NAME)
    if secret not in known_secrets:
        configured = ", ".join(sorted(known_secrets)) or "none"
        raise _fail(
            "UNKNOWN_SECRET",
            f"no secret of that name is configured in the gateway's [inspection] secrets (configured: {configured})",
            f"{path}.secret",
        )
    return Credential(header=header, secret=secret, template=template)


def _unique[T](
    item: Callable[[object, str], T], key: Callable[[T], str], code: str, what: str, field: str
) -> Callable[[object, str], T]:
    """`item` for `_list`, refusing a second item with the same `key` (at `<item path>.<field>`, in input order)."""
    first: dict[str, str] = {}

    def parse(value: object, path: str) -> T:
        parsed = item(value, path)
        name = key(parsed)
        if first.setdefault(name, path) != path:
            raise _fail(code, f"{name} {what} in {first[name]}", f"{path}.{field}")
        return parsed

    return parse


def _inspect_entry(value: object, path: str, known_secrets: frozenset[str]) -> InspectRule:
    data = _expect_mapping(value, path)
    _check_no_secret_values(data, INSPECT_FIELDS, path)
    _check_known(data, INSPECT_FIELDS, path)
    if "hosts" not in data:
        raise _fail("MISSING_FIELD", "an inspect entry names the hosts it allows and marks", f"{path}.hosts")
    hosts = _list(data["hosts"], f"{path}.hosts", _hostname)
    ports = _list(data["ports"], f"{path}.ports", _port) if "ports" in data else DEFAULT_INSPECT_PORTS
    for name, what in (("hosts", hosts), ("ports", ports)):
        if not what:
            raise _fail("MISSING_FIELD", f"an inspect entry needs at least one of its {name}", f"{path}.{name}")
    deny_reason = _string(data.get("deny_reason", ""), f"{path}.deny_reason", MAX_DESCRIPTION)
    if not _PRINTABLE.fullmatch(deny_reason):
        raise _fail(
            "INVALID_DENY_REASON",
            "a deny reason is one line of visible ASCII and spaces (it is sent in a response header)",
            f"{path}.deny_reason",
        )
    header_match = _unique(
        _header_match, lambda m: m.name, "HEADER_MATCH_DUPLICATE", "already has a condition (one per header)", "name"
    )
    credential = _unique(
        lambda item, where: _credential(item, where, known_secrets),
        lambda c: c.header,
        "CREDENTIAL_HEADER_DUPLICATE",
        "is already bound to a secret",
        "header",
    )
    return InspectRule(
        hosts=hosts,
        ports=ports,
        methods=_list(data.get("methods", []), f"{path}.methods", _method),
        paths=_list(data.get("paths", []), f"{path}.paths", _path_pattern),
        headers=_list(data.get("headers", []), f"{path}.headers", header_match),
        deny_reason=deny_reason,
        credentials=_list(data.get("credentials", []), f"{path}.credentials", credential),
    )


def _inspect_entries(value: object, path: str, known_secrets: frozenset[str]) -> tuple[InspectRule, ...]:
    owner: dict[str, str] = {}

    def entry(item: object, where: str) -> InspectRule:
        rule = _inspect_entry(item, where, known_secrets)
        for position, raw in enumerate(_expect_mapping(item, where)["hosts"]):
            host = _hostname(raw, f"{where}.hosts[{position}]")
            if owner.setdefault(host, where) != where:
                raise _fail(
                    "INSPECT_HOST_DUPLICATE",
                    f"{host} is already inspected by {owner[host]}; a host belongs to one entry",
                    f"{where}.hosts[{position}]",
                )
        return rule

    return _list(value, path, entry)


def _looks_like_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _split_egress_list(entries: object, path: str) -> Egress:
    """The shorthand: one list mixing hostnames and CIDRs (`["api.openai.com", "10.0.0.0/8"]`)."""
    if not isinstance(entries, list):
        raise _fail("INVALID_TYPE", f"expected an object or a list, got {_type_name(entries)}", path)
    if len(entries) > MAX_LIST_ENTRIES:
        raise _fail("TOO_MANY_ENTRIES", f"{len(entries)} entries; at most {MAX_LIST_ENTRIES} are allowed", path)
    hosts: list[str] = []
    cidrs: list[IPNetwork] = []
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]"
        if isinstance(entry, str):
            try:
                cidrs.append(ipaddress.ip_network(entry))  # a bare address is a /32 or /128
                continue
            except ValueError:
                if "/" in entry and _looks_like_address(entry.split("/", 1)[0]):
                    cidrs.append(_network(entry, where))  # raises the precise CIDR error
        hosts.append(_host_entry(entry, where))
    return Egress(allow_hosts=tuple(dict.fromkeys(hosts)), allow_cidrs=tuple(dict.fromkeys(cidrs)) if cidrs else None)


def parse_egress(data: object, path: str, known_presets: Iterable[str], known_secrets: Iterable[str]) -> Egress:
    if data is None:
        return Egress()
    if isinstance(data, list):
        return _split_egress_list(data, path)
    data = _expect_mapping(data, path)
    _check_known(data, EGRESS_FIELDS, path)
    known = set(known_presets)

    def preset(value: object, where: str) -> str:
        if not isinstance(value, str) or value not in known:
            raise _fail("UNKNOWN_PRESET", f"{value!r} is not a preset; known: {', '.join(sorted(known))}", where)
        return value

    values: dict[str, Any] = {}
    for name, raw in data.items():
        where = f"{path}.{name}"
        if raw is None:
            continue
        if name == "mode":
            if raw not in EGRESS_MODES:
                raise _fail("INVALID_MODE", f"{raw!r} is not a mode; use allow_all or deny_all", where)
            values[name] = raw
        elif name == "allow_internet":
            values[name] = _bool(raw, where)
        elif name == "enforcement":
            if raw not in ENFORCEMENT_MODES:
                raise _fail("INVALID_ENFORCEMENT", f"{raw!r} is not an enforcement; use enforce or report", where)
            values[name] = raw
        elif name in ("allow_hosts", "deny_hosts"):
            values[name] = _list(raw, where, _host_entry)
        elif name == "allow_ech":
            values[name] = _list(raw, where, _hostname)
        elif name == "presets":
            values[name] = _list(raw, where, preset)
        elif name in ("allow_cidrs", "deny_cidrs"):
            values[name] = _list(raw, where, _network)
        elif name == "inspect":
            values[name] = _inspect_entries(raw, where, frozenset(known_secrets))
        elif name == "deny_messages":
            values[name] = _deny_messages(raw, where)
        else:  # allow_ports, host_ports
            values[name] = _list(raw, where, _port)
    egress = Egress(**values)
    _check_egress_rules(egress, path)
    return egress


def _deny_messages(value: object, path: str) -> dict[str, str]:
    data = _expect_mapping(value, path)
    if len(data) > MAX_LIST_ENTRIES:
        raise _fail("TOO_MANY_ENTRIES", f"at most {MAX_LIST_ENTRIES} messages", path)
    messages: dict[str, str] = {}
    for key, text in data.items():
        where = f"{path}.{key}" if isinstance(key, str) and _PRINTABLE.fullmatch(key) and len(key) <= 60 else path
        if not isinstance(key, str) or len(key) > MAX_MESSAGE_KEY or not _PRINTABLE.fullmatch(key):
            raise _fail("INVALID_MESSAGE_RULE", f"a key is a rule as records show it, at most {MAX_MESSAGE_KEY} "
                        "visible ASCII characters", where)  # fmt: skip
        if Rule.of_label(key) is None:
            raise _fail(
                "INVALID_MESSAGE_RULE",
                f"{key!r} names no rule; a key is a rule as flow records show it, e.g. default:deny, deny_hosts, "
                "deny_hosts *.tracker.example, builtin:metadata",
                where,
            )
        text = _string(text, where, MAX_DENY_MESSAGE)
        if not text.strip() or not _PRINTABLE.fullmatch(text):
            raise _fail(
                "INVALID_MESSAGE",
                "a message is one non-empty line of visible ASCII and spaces (it is sent in a response header and "
                "a DNS answer)",
                where,
            )
        messages[key] = text.strip()
    return messages


def _check_egress_rules(egress: Egress, path: str) -> None:
    """The egress-mode validation rules (zwrm's), which hold for a record on its own (template or sandbox)."""
    if egress.mode == "allow_all":
        # Not allow_ech: with deny_hosts (here or from the template) allow_all checks names, and ECH with them.
        for name in ("allow_cidrs", "deny_cidrs", "allow_ports", "allow_hosts", "presets", "inspect"):
            if getattr(egress, name):
                raise _fail(
                    "EGRESS_MODE_CONFLICT",
                    f"mode allow_all already allows everything; {name} only makes sense with mode deny_all",
                    f"{path}.{name}",
                )
    if egress.allow_ports and not egress.allow_cidrs:
        raise _fail(
            "ALLOW_PORTS_WITHOUT_CIDRS",
            "allow_ports restricts allow_cidrs, so allow_cidrs must be set",
            f"{path}.allow_ports",
        )
    for index, net in enumerate(egress.allow_cidrs or ()):
        inside = next((m for m in _METADATA_NETS if m.version == net.version and net.subnet_of(m)), None)  # type: ignore[arg-type]
        if inside is not None:
            raise _fail(
                "ALLOW_METADATA_ENDPOINT",
                f"{net} lies in {inside} (a cloud metadata endpoint), which the gateway refuses for every sandbox "
                "whatever the policy says; remove it from allow_cidrs",
                f"{path}.allow_cidrs[{index}]",
            )
    for index, net in enumerate(egress.deny_cidrs or ()):
        if net.version == 4 and net.overlaps(METADATA_RANGE):
            raise _fail(
                "DENY_METADATA_RANGE",
                f"{net} overlaps the link-local / metadata range {METADATA_RANGE}, which the gateway already "
                "refuses for every sandbox; remove it from deny_cidrs",
                f"{path}.deny_cidrs[{index}]",
            )
    if egress.allow_internet is False:
        for name in ("allow_hosts", "presets", "allow_cidrs", "inspect", "allow_ech"):
            if getattr(egress, name):
                raise _fail(
                    "EGRESS_DISABLED_WITH_RULES",
                    f"allow_internet is false, which blocks all outbound traffic; "
                    f"clear {name} or set allow_internet true",
                    f"{path}.{name}",
                )


def parse_limits(data: object, path: str) -> Limits:
    if data is None:
        return Limits()
    data = _expect_mapping(data, path)
    _check_known(data, LIMITS_SCHEMA, path)
    values = {name: _int(raw, f"{path}.{name}", *LIMIT_RANGES[name]) for name, raw in data.items() if raw is not None}
    limits = Limits(**values)
    burst, sustained = limits.burst_mbit, limits.bandwidth_mbit
    if burst is not None and sustained is not None and burst < sustained:
        raise _fail(
            "BURST_BELOW_SUSTAINED",
            f"burst_mbit {limits.burst_mbit} is below bandwidth_mbit {limits.bandwidth_mbit}",
            f"{path}.burst_mbit",
        )
    return limits


def parse_ingress(data: object, path: str) -> Ingress:
    if data is None:
        return Ingress()
    data = _expect_mapping(data, path)
    _check_known(data, INGRESS_SCHEMA, path)

    def source(value: object, where: str) -> IPNetwork:
        if isinstance(value, str) and "/" not in value:
            return ipaddress.ip_network(_address(value, where))
        return _network(value, where)

    return Ingress(
        sources=_list(data.get("sources") or [], f"{path}.sources", source),
        ports=_list(data.get("ports") or [], f"{path}.ports", _port),
        public_access=_bool(data.get("public_access", False), f"{path}.public_access"),
    )


def _private_link(value: object, path: str) -> PrivateLink:
    if isinstance(value, str):
        return PrivateLink(_identifier(value, path, "sandbox id"))
    data = _expect_mapping(value, path)
    _check_known(data, PRIVATE_LINK_SCHEMA, path)
    if "source" not in data:
        raise _fail("MISSING_FIELD", "a private link names its source sandbox id", f"{path}.source")
    protocol = data.get("protocol", "tcp")
    if not isinstance(protocol, str) or protocol not in LINK_PROTOCOLS:
        raise _fail(
            "INVALID_PROTOCOL",
            f"{protocol!r} is not a link protocol; use tcp or udp (list the link twice for both)",
            f"{path}.protocol",
        )
    return PrivateLink(
        _identifier(data["source"], f"{path}.source", "sandbox id"),
        _list(data.get("ports") or [], f"{path}.ports", _port),
        protocol,
    )


def _labels(value: object, path: str) -> dict[str, str]:
    data = _expect_mapping(value, path)
    if len(data) > MAX_LIST_ENTRIES:
        raise _fail("TOO_MANY_ENTRIES", f"at most {MAX_LIST_ENTRIES} labels", path)
    return {_text(k, path, MAX_LABEL_KEY): _text(v, f"{path}.{k}", MAX_LABEL_VALUE) for k, v in data.items()}


def parse_sandbox(
    data: object,
    *,
    subnets: Sequence[IPNetwork],
    known_presets: Iterable[str],
    known_secrets: Iterable[str],
    sandbox_id: str | None = None,
) -> Sandbox:
    """Parse and validate one sandbox record. `sandbox_id`, when given, is the id from the URL or key.

    `known_presets` and `known_secrets` are the names the configuration defines (presets; [inspection] secrets)."""
    data = _expect_mapping(data, "")
    _check_known(data, SANDBOX_FIELDS, "")
    raw_id = data.get("id", sandbox_id)
    if raw_id is None:
        raise _fail("MISSING_FIELD", "a sandbox needs an id", "id")
    sid = _identifier(raw_id, "id")
    if sandbox_id is not None and sid != sandbox_id:
        raise _fail("ID_MISMATCH", f"record id {sid!r} does not match {sandbox_id!r}", "id")

    profile = data.get("profile", DEFAULT_PROFILE)
    if isinstance(profile, str) and profile in UNSUPPORTED_PROFILES:  # a list or object is unhashable
        raise _fail("PROFILE_NOT_SUPPORTED", UNSUPPORTED_PROFILES[profile], "profile")
    if profile not in PROFILES:
        raise _fail("INVALID_PROFILE", f"{profile!r} is not a profile; use one of {', '.join(PROFILES)}", "profile")

    if "addresses" not in data:
        raise _fail("MISSING_FIELD", "a sandbox needs at least one address inside the sandbox subnets", "addresses")
    addresses = _list(data["addresses"], "addresses", _address, limit=MAX_ADDRESSES)
    if not addresses:
        raise _fail("MISSING_FIELD", "a sandbox needs at least one address inside the sandbox subnets", "addresses")
    for index, addr in enumerate(addresses):
        if not any(addr.version == net.version and addr in net for net in subnets):
            raise _fail(
                "ADDRESS_OUTSIDE_SUBNETS",
                f"{addr} is not inside the sandbox subnets ({', '.join(str(n) for n in subnets)})",
                f"addresses[{index}]",
            )

    template = data.get("template")
    if template is not None:
        template = _identifier(template, "template", "template name")

    egress = parse_egress(data.get("egress"), "egress", known_presets, known_secrets)
    _check_profile_fields(profile, egress)
    return Sandbox(
        id=sid,
        addresses=addresses,
        profile=profile,
        template=template,
        egress=egress,
        ingress=parse_ingress(data.get("ingress"), "ingress"),
        limits=parse_limits(data.get("limits"), "limits"),
        private_links=_list(data.get("private_links") or [], "private_links", _private_link),
        labels=_labels(data.get("labels") or {}, "labels"),
    )


#: Egress fields a sandbox may set itself, per profile. The profile is the ceiling the
#: caller's scope was checked against, so a field that would widen it is refused here.
PROFILE_EGRESS_FIELDS: Mapping[str, frozenset[str]] = {
    "isolated": frozenset({"deny_messages"}),
    "registry": frozenset({"allow_internet", "presets", "deny_cidrs", "deny_hosts", "mode", "deny_messages"}),
    "allowlisted": frozenset(EGRESS_FIELDS),
    "unrestricted": frozenset(EGRESS_FIELDS),
}


def _check_profile_fields(profile: str, egress: Egress) -> None:
    allowed = PROFILE_EGRESS_FIELDS[profile]
    for name in egress.set_fields():
        if name not in allowed and getattr(egress, name) != ():  # an explicitly empty list widens nothing
            hint = (
                "an isolated sandbox has no network at all; create it with profile allowlisted"
                if profile == "isolated"
                else "the registry profile allows only the built-in registries and presets; "
                "use profile allowlisted for your own hosts and CIDRs"
            )
            raise _fail(
                "PROFILE_CONFLICT", f"egress.{name} is not available in profile {profile}: {hint}", f"egress.{name}"
            )
    if egress.mode == "allow_all" and profile != "unrestricted":
        raise _fail(
            "PROFILE_CONFLICT",
            f"mode allow_all is the unrestricted profile; profile {profile} cannot use it",
            "egress.mode",
        )


def parse_template(
    data: object, *, known_presets: Iterable[str], known_secrets: Iterable[str], name: str | None = None
) -> Template:
    data = _expect_mapping(data, "")
    _check_known(data, TEMPLATE_FIELDS, "")
    raw_name = data.get("name", name)
    if raw_name is None:
        raise _fail("MISSING_FIELD", "a template needs a name", "name")
    tname = _identifier(raw_name, "name", "template name")
    if name is not None and tname != name:
        raise _fail("ID_MISMATCH", f"record name {tname!r} does not match {name!r}", "name")
    return Template(
        name=tname,
        description=_text(data.get("description", ""), "description"),
        egress=parse_egress(data.get("egress"), "egress", known_presets, known_secrets),
        limits=parse_limits(data.get("limits"), "limits"),
        ceiling=_bool(data.get("ceiling", False), "ceiling"),
    )
