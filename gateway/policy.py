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
from gateway.hostnames import MAX_HOSTNAME_LENGTH, normalize_pattern

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROFILES = ("isolated", "registry", "allowlisted", "unrestricted")
DEFAULT_PROFILE = "isolated"
UNSUPPORTED_PROFILES = {
    "transit": "the transit profile (L2 attachment to tenant bridges) is not supported by this gateway; "
    "it filters at L3/L4 and above. Use allowlisted or unrestricted.",
}
EGRESS_MODES = ("allow_all", "deny_all")
#: L4 protocols a private link may open; one link opens one (list the link twice for both).
LINK_PROTOCOLS = ("tcp", "udp")
MAX_LIST_ENTRIES = 50
MAX_ADDRESSES = 8
METADATA_RANGE = ipaddress.ip_network("169.254.0.0/16")
ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62})$")
MAX_DESCRIPTION = 500
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 253

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
    allow_hosts: tuple[str, ...] | None = None
    presets: tuple[str, ...] | None = None
    allow_cidrs: tuple[IPNetwork, ...] | None = None
    deny_cidrs: tuple[IPNetwork, ...] | None = None
    allow_ports: tuple[int, ...] | None = None
    host_ports: tuple[int, ...] | None = None

    def set_fields(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def merged_over(self, base: Egress) -> Egress:
        """This record's set fields over `base` (a template's)."""
        return replace(base, **{name: getattr(self, name) for name in self.set_fields()})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.set_fields():
            value = getattr(self, name)
            if name in ("allow_cidrs", "deny_cidrs"):
                value = [str(net) for net in value]
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
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
    "allow_hosts": nullable(list_schema(HOSTNAME_SCHEMA, "Hostnames the sandbox may reach (TLS SNI / HTTP Host).")),
    "presets": nullable(list_schema({"type": "string"}, "Names of presets (GET /v1/presets) to include.")),
    "allow_cidrs": nullable(list_schema(CIDR_SCHEMA, "Destinations allowed by address (deny_all mode).")),
    "deny_cidrs": nullable(
        list_schema(CIDR_SCHEMA, "Destinations refused by address; evaluated before every allow rule.")
    ),
    "allow_ports": nullable(list_schema(PORT_SCHEMA, "Restrict allow_cidrs to these ports; needs allow_cidrs.")),
    "host_ports": nullable(list_schema(PORT_SCHEMA, "Restrict allow_hosts to these ports (default: any).")),
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
    "egress": nullable(schema_ref("Egress")),
    "limits": nullable(schema_ref("Limits")),
}
EGRESS_FIELDS: Final = tuple(EGRESS_SCHEMA)
SANDBOX_FIELDS: Final = tuple(SANDBOX_SCHEMA)
TEMPLATE_FIELDS: Final = tuple(TEMPLATE_SCHEMA)


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
        hosts.append(_hostname(entry, where))
    return Egress(allow_hosts=tuple(dict.fromkeys(hosts)), allow_cidrs=tuple(dict.fromkeys(cidrs)) if cidrs else None)


def parse_egress(data: object, path: str, known_presets: Iterable[str]) -> Egress:
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
        elif name == "allow_hosts":
            values[name] = _list(raw, where, _hostname)
        elif name == "presets":
            values[name] = _list(raw, where, preset)
        elif name in ("allow_cidrs", "deny_cidrs"):
            values[name] = _list(raw, where, _network)
        else:  # allow_ports, host_ports
            values[name] = _list(raw, where, _port)
    egress = Egress(**values)
    _check_egress_rules(egress, path)
    return egress


def _check_egress_rules(egress: Egress, path: str) -> None:
    """The egress-mode validation rules (zwrm's), which hold for a record on its own (template or sandbox)."""
    if egress.mode == "allow_all":
        for name in ("allow_cidrs", "deny_cidrs", "allow_ports", "allow_hosts", "presets"):
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
    for index, net in enumerate(egress.deny_cidrs or ()):
        if net.version == 4 and net.overlaps(METADATA_RANGE):
            raise _fail(
                "DENY_METADATA_RANGE",
                f"{net} overlaps the link-local / metadata range {METADATA_RANGE}, which the gateway already "
                "refuses for every sandbox; remove it from deny_cidrs",
                f"{path}.deny_cidrs[{index}]",
            )
    if egress.allow_internet is False:
        for name in ("allow_hosts", "presets", "allow_cidrs"):
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
    sandbox_id: str | None = None,
) -> Sandbox:
    """Parse and validate one sandbox record. `sandbox_id`, when given, is the id from the URL or key."""
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

    egress = parse_egress(data.get("egress"), "egress", known_presets)
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
    "isolated": frozenset(),
    "registry": frozenset({"allow_internet", "presets", "deny_cidrs", "mode"}),
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


def parse_template(data: object, *, known_presets: Iterable[str], name: str | None = None) -> Template:
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
        egress=parse_egress(data.get("egress"), "egress", known_presets),
        limits=parse_limits(data.get("limits"), "limits"),
    )
