"""The control API's OpenAPI 3.1 document, as plain data (served at `/openapi.json`).

Kept true by tests: every route the app registers is documented here with the same
methods and required scope (`x-required-scope`), every documented route exists, the
example request bodies pass the real parser, and the API's actual answers in the test
suite validate against the response schemas for their status.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from gateway import __version__
from gateway.decision import PROTOCOLS
from gateway.flowlog import BATCH_NAME_PATTERN, FIELD_NAMES, MAX_LIST_LIMIT
from gateway.policy import (
    EGRESS_MODES,
    ID_PATTERN,
    LIMIT_RANGES,
    LINK_PROTOCOLS,
    MAX_ADDRESSES,
    MAX_LIST_ENTRIES,
    PROFILES,
    UNSUPPORTED_PROFILES,
)

JSON: Final = "application/json"
NDJSON: Final = "application/x-ndjson"
MERGE_PATCH: Final = "application/merge-patch+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema, or null (the parser treats null as 'not set', e.g. to inherit from the template)."""
    return {"anyOf": [schema, {"type": "null"}]}


def _list_of(item: dict[str, Any], description: str, limit: int = MAX_LIST_ENTRIES) -> dict[str, Any]:
    return {"type": "array", "items": item, "maxItems": limit, "description": description}


_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_HOSTNAME = {
    "type": "string",
    "maxLength": 253,
    "description": "An exact hostname (api.example.com) or a first-level wildcard (*.example.com, which matches "
    "exactly one extra label). No scheme, path, port, `**` or mid-label `*`; labels are 1-63 RFC 1035 "
    "characters; internationalised names are stored as punycode.",
}
_CIDR = {"type": "string", "description": "A network in CIDR notation with no host bits set (10.0.0.0/8)."}
_ADDRESS = {"type": "string", "description": "An IPv4 or IPv6 address."}
_IDENT = {"type": "string", "pattern": ID_PATTERN.pattern}

_EGRESS_PROPERTIES: dict[str, Any] = {
    "mode": _nullable({"type": "string", "enum": list(EGRESS_MODES)}),
    "allow_internet": _nullable({"type": "boolean"}),
    "allow_hosts": _nullable(_list_of(_HOSTNAME, "Hostnames the sandbox may reach (TLS SNI / HTTP Host).")),
    "presets": _nullable(_list_of({"type": "string"}, "Names of presets (GET /v1/presets) to include.")),
    "allow_cidrs": _nullable(_list_of(_CIDR, "Destinations allowed by address (deny_all mode).")),
    "deny_cidrs": _nullable(_list_of(_CIDR, "Destinations refused by address; evaluated before every allow rule.")),
    "allow_ports": _nullable(_list_of(_PORT, "Restrict allow_cidrs to these ports; needs allow_cidrs.")),
    "host_ports": _nullable(_list_of(_PORT, "Restrict allow_hosts to these ports (default: any).")),
}

_LIMIT_PROPERTIES: dict[str, Any] = {
    name: _nullable({"type": "integer", "minimum": low, "maximum": high}) for name, (low, high) in LIMIT_RANGES.items()
}

_SANDBOX_PROPERTIES: dict[str, Any] = {
    "id": {**_IDENT, "description": "1-63 characters: lowercase letters, digits, '-' and '_'."},
    "addresses": {
        "type": "array",
        "items": _ADDRESS,
        "minItems": 1,
        "maxItems": MAX_ADDRESSES,
        "description": "The sandbox's source addresses, inside the configured sandbox subnets; unique across "
        "sandboxes.",
    },
    "profile": {
        "type": "string",
        "enum": list(PROFILES),
        "default": "isolated",
        "description": "Set at creation, immutable afterwards. Each profile but isolated needs the caller's "
        f"scope network:<profile>. Not supported: {', '.join(UNSUPPORTED_PROFILES)}.",
    },
    "template": _nullable({**_IDENT, "description": "A template whose egress and limits this sandbox inherits."}),
    "egress": {
        "description": "Own egress rules over the template's; a list is a shorthand mixing hostnames and CIDRs.",
        "anyOf": [
            _ref("Egress"),
            {"type": "array", "items": {"type": "string"}, "maxItems": MAX_LIST_ENTRIES},
            {"type": "null"},
        ],
    },
    "ingress": _nullable(_ref("Ingress")),
    "limits": _nullable(_ref("Limits")),
    "private_links": _nullable(
        _list_of({"anyOf": [_IDENT, _ref("PrivateLink")]}, "Sandboxes that may open connections to this one.")
    ),
    "labels": _nullable(
        {"type": "object", "additionalProperties": {"type": "string", "maxLength": 253}, "maxProperties": 50}
    ),
}

_TEMPLATE_PROPERTIES: dict[str, Any] = {
    "name": _IDENT,
    "description": {"type": "string", "maxLength": 500},
    "egress": _nullable(_ref("Egress")),
    "limits": _nullable(_ref("Limits")),
}


def _schemas() -> dict[str, Any]:
    return {
        "Error": {
            "type": "object",
            "description": "Every error answer. `code` is stable; `message` is for people; `field` names the "
            "offending input (a JSON path such as egress.allow_hosts[2], a query parameter or a header) or null.",
            "required": ["code", "message", "field"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$"},
                "message": {"type": "string"},
                "field": {"type": ["string", "null"]},
            },
        },
        "Egress": {
            "type": "object",
            "additionalProperties": False,
            "description": "Fields left out (or null) are inherited from the template, then the profile.",
            "properties": _EGRESS_PROPERTIES,
        },
        "Ingress": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "sources": _list_of({"type": "string"}, "Source addresses or CIDRs allowed to connect in."),
                "ports": _list_of(_PORT, "Ports inside the sandbox that may be reached."),
                "public_access": {"type": "boolean"},
            },
        },
        "Limits": {"type": "object", "additionalProperties": False, "properties": _LIMIT_PROPERTIES},
        "PrivateLink": {
            "type": "object",
            "additionalProperties": False,
            "required": ["source"],
            "properties": {
                "source": _IDENT,
                "ports": _list_of(_PORT, "Ports allowed (empty: any)."),
                "protocol": {
                    "type": "string",
                    "enum": list(LINK_PROTOCOLS),
                    "default": "tcp",
                    "description": "The L4 protocol the link opens (one per link; list a link twice for both).",
                },
            },
        },
        "Sandbox": {
            "type": "object",
            "description": "A sandbox record as stored (only set egress and limits fields appear).",
            "additionalProperties": False,
            "required": list(_SANDBOX_PROPERTIES),
            "properties": {
                **_SANDBOX_PROPERTIES,
                "template": {"type": ["string", "null"]},
                "egress": _ref("Egress"),
                "ingress": _ref("Ingress"),
                "limits": _ref("Limits"),
                "private_links": {"type": "array", "items": _ref("PrivateLink")},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "SandboxCreate": {
            "type": "object",
            "additionalProperties": False,
            "required": ["id", "addresses"],
            "properties": _SANDBOX_PROPERTIES,
        },
        "SandboxReplace": {
            "type": "object",
            "description": "The whole record; `id` may be left out and must match the URL when given.",
            "additionalProperties": False,
            "required": ["addresses"],
            "properties": _SANDBOX_PROPERTIES,
        },
        "SandboxPatch": {
            "type": "object",
            "description": "A JSON merge patch (RFC 7396): objects merge, null removes a field, anything else "
            "replaces it. The result is validated as a whole record.",
            "additionalProperties": False,
            "properties": {name: {} for name in _SANDBOX_PROPERTIES},
        },
        "SandboxList": {
            "type": "object",
            "additionalProperties": False,
            "required": ["sandboxes"],
            "properties": {"sandboxes": {"type": "array", "items": _ref("Sandbox")}},
        },
        "Template": {
            "type": "object",
            "additionalProperties": False,
            "required": list(_TEMPLATE_PROPERTIES),
            "properties": {**_TEMPLATE_PROPERTIES, "egress": _ref("Egress"), "limits": _ref("Limits")},
        },
        "TemplateCreate": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": _TEMPLATE_PROPERTIES,
        },
        "TemplateReplace": {
            "type": "object",
            "description": "The whole template; `name` may be left out and must match the URL when given.",
            "additionalProperties": False,
            "properties": _TEMPLATE_PROPERTIES,
        },
        "TemplateList": {
            "type": "object",
            "additionalProperties": False,
            "required": ["templates"],
            "properties": {"templates": {"type": "array", "items": _ref("Template")}},
        },
        "Preset": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "description", "hosts", "ports"],
            "properties": {
                "name": {"type": "string"},
                "description": {"type": "string"},
                "hosts": {"type": "array", "items": _HOSTNAME},
                "ports": {
                    "anyOf": [{"type": "array", "items": _PORT}, {"type": "null"}],
                    "description": "null: any port.",
                },
            },
        },
        "PresetList": {
            "type": "object",
            "additionalProperties": False,
            "required": ["presets"],
            "properties": {"presets": {"type": "array", "items": _ref("Preset")}},
        },
        "EffectivePolicy": {
            "type": "object",
            "description": "The compiled policy the data plane enforces: the sandbox merged over its template, "
            "capped by its profile, with the default limits filled in.",
            "additionalProperties": False,
            "required": ["sandbox", "profile", "allow_internet", "mode", "egress", "limits"],
            "properties": {
                "sandbox": {"type": "string"},
                "profile": {"type": "string", "enum": list(PROFILES)},
                "allow_internet": {"type": "boolean"},
                "mode": {"type": "string", "enum": list(EGRESS_MODES)},
                "egress": _ref("Egress"),
                "limits": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": list(LIMIT_RANGES),
                    "properties": {name: {"type": "integer", "minimum": 1} for name in LIMIT_RANGES},
                },
            },
        },
        "Verdict": {
            "type": "object",
            "required": ["allowed", "reason", "rule"],
            "properties": {
                "allowed": {"type": "boolean"},
                "reason": {"type": "string", "description": "Why, for people."},
                "rule": {
                    "type": "string",
                    "description": "Which rule decided, e.g. `allow_hosts api.github.com`, "
                    "`preset git-hosts`, `deny_cidrs 10.0.0.0/8`, `default:deny`.",
                },
            },
        },
        "Explain": {
            "type": "object",
            "description": "The verdict the data plane would give this connection, and the policy it used.",
            "additionalProperties": False,
            "required": ["allowed", "reason", "rule", "sandbox", "request", "policy"],
            "properties": {
                "allowed": {"type": "boolean"},
                "reason": {"type": "string"},
                "rule": {"type": "string"},
                "sandbox": {"type": "string"},
                "request": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["host", "address", "port", "protocol"],
                    "properties": {
                        "host": {"type": ["string", "null"]},
                        "address": {"type": ["string", "null"]},
                        "port": {"anyOf": [_PORT, {"type": "null"}]},
                        "protocol": {"type": "string", "enum": list(PROTOCOLS)},
                    },
                },
                "policy": _ref("EffectivePolicy"),
            },
        },
        "Rejection": {
            "type": "object",
            "description": "A record written by someone other than this API (a file edit, another service) that "
            "failed validation; the last good version stays in force until a valid one arrives.",
            "required": ["kind", "key", "at", "code", "message", "field"],
            "properties": {
                "kind": {"type": "string"},
                "key": {"type": "string"},
                "at": {"type": "number", "description": "Unix time of the rejection."},
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": ["string", "null"]},
            },
        },
        "Status": {
            "type": "object",
            "description": "The policy store's state. Backends may add fields (the embedded store adds `path`).",
            "required": ["backend", "ready", "sandboxes", "templates", "rejected", "auth"],
            "properties": {
                "backend": {"type": "string", "enum": ["embedded", "redis"]},
                "ready": {"type": "boolean"},
                "sandboxes": {"type": "integer", "minimum": 0},
                "templates": {"type": "integer", "minimum": 0},
                "rejected": {"type": "array", "items": _ref("Rejection")},
                "auth": {
                    "type": "string",
                    "enum": ["tokens", "open-loopback"],
                    "description": "open-loopback: no tokens configured, so the API listens on loopback only "
                    "and admits every local caller.",
                },
                "data_plane": {
                    "type": "object",
                    "description": "Only with `gateway run --data-plane`.",
                    "additionalProperties": False,
                    "required": ["steering", "steering_applied", "unattached_dropped", "unattached_recent"],
                    "properties": {
                        "steering": {"type": "boolean", "description": "Started with --steer."},
                        "steering_applied": {"type": "boolean"},
                        "unattached_dropped": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Packets dropped since start-up because their source, routed to the "
                            "gateway, is no sandbox's address (read every egress.unattached_log_interval).",
                        },
                        "unattached_recent": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "Such sources seen within the last interval (at most 64).",
                        },
                    },
                },
            },
        },
        "AuditBatch": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "size", "first_ts_us"],
            "properties": {
                "name": {"type": "string", "pattern": BATCH_NAME_PATTERN.pattern},
                "size": {"type": "integer", "minimum": 0, "description": "Bytes."},
                "first_ts_us": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "When the batch's first record was written (its end_us), µs since the epoch.",
                },
            },
        },
        "DnsQuery": {
            "type": "object",
            "additionalProperties": False,
            "required": [
                "time",
                "sandbox",
                "client",
                "transport",
                "name",
                "type",
                "rcode",
                "answers",
                "latency_ms",
                "allowed",
                "code",
                "reason",
                "rule",
                "cached",
            ],
            "properties": {
                "time": {"type": "number", "description": "Seconds since the epoch."},
                "sandbox": {"type": "string"},
                "client": {"type": "string", "description": "The sandbox address and port that asked."},
                "transport": {"type": "string", "enum": ["udp", "tcp"]},
                "name": {"type": "string"},
                "type": {"type": "string", "description": "The query type (A, AAAA, HTTPS, ...)."},
                "rcode": {"type": "string", "description": "NOERROR, NXDOMAIN, REFUSED, SERVFAIL, FORMERR, ..."},
                "answers": {"type": "array", "items": {"type": "string"}},
                "latency_ms": {"type": "number"},
                "allowed": {"type": "boolean"},
                "code": {"type": "string", "description": "FORWARDED, CACHED, BLOCKED_POLICY, REFUSED_ISOLATED, ..."},
                "reason": {"type": "string"},
                "rule": {"type": "string"},
                "cached": {"type": "boolean"},
            },
        },
        "DnsLog": {
            "type": "object",
            "additionalProperties": False,
            "required": ["queries"],
            "properties": {"queries": {"type": "array", "items": _ref("DnsQuery")}},
        },
        "AuditBatchList": {
            "type": "object",
            "additionalProperties": False,
            "required": ["batches", "next_continuation_token"],
            "properties": {
                "batches": {"type": "array", "items": _ref("AuditBatch"), "maxItems": MAX_LIST_LIMIT},
                "next_continuation_token": {
                    "type": ["string", "null"],
                    "description": "Pass as continuation_token for the next page; null: this was the last page.",
                },
            },
        },
        "FlowRecord": {
            "type": "object",
            "description": "One line of an audit batch: one connection's metadata (never payload or credentials).",
            "additionalProperties": False,
            "required": list(FIELD_NAMES),
            "properties": {
                "start_us": {"type": "integer", "description": "µs since the epoch."},
                "end_us": {"type": "integer", "description": "µs since the epoch."},
                "sandbox": {"type": "string"},
                "src_addr": _ADDRESS,
                "src_port": {"type": "integer"},
                "dst_addr": {**_ADDRESS, "description": "The address the gateway dialled."},
                "dst_port": {"type": "integer"},
                "orig_dst_addr": {**_ADDRESS, "description": "The destination the sandbox asked for."},
                "orig_dst_port": {"type": "integer"},
                "hostname": {"type": ["string", "null"], "description": "TLS SNI or HTTP Host."},
                "protocol": {"type": "string", "enum": ["tls", "http", "tcp", "dns"]},
                "bytes_up": {"type": "integer", "minimum": 0},
                "bytes_down": {"type": "integer", "minimum": 0},
                "duration_ms": {"type": "number", "minimum": 0},
                "verdict": {"type": "string", "enum": ["allow", "deny"]},
                "reason": {"type": "string"},
                "rule": {"type": "string"},
            },
        },
        "TunnelCreate": {
            "type": "object",
            "additionalProperties": False,
            "required": ["port"],
            "properties": {
                "port": {**_PORT, "description": "The port inside the sandbox to expose (plain HTTP there)."},
                "label": {"type": "string", "minLength": 1, "maxLength": 64, "description": "For people only."},
                "password": {
                    "type": "string",
                    "minLength": 8,
                    "maxLength": 256,
                    "writeOnly": True,
                    "description": "Protects the tunnel (login page, or HTTP Basic with any user name). Stored as "
                    "an scrypt hash; never returned or logged.",
                },
                "ttl": {
                    "type": "number",
                    "minimum": 10,
                    "description": "Seconds until the tunnel expires (default and maximum: [tunnel] default_ttl, "
                    "max_ttl).",
                },
                "rewrite_host": {
                    "type": "boolean",
                    "default": False,
                    "description": "Send Host: localhost:<port> upstream, for dev servers that check Host.",
                },
            },
        },
        "Tunnel": {
            "type": "object",
            "description": "A temporary HTTPS URL for a sandbox port. Its id is the random first label of the URL.",
            "additionalProperties": False,
            "required": [
                "id",
                "sandbox",
                "address",
                "port",
                "label",
                "url",
                "password_protected",
                "rewrite_host",
                "created_at",
                "expires_at",
                "revoked_at",
                "revoked_reason",
                "state",
            ],
            "properties": {
                "id": {"type": "string", "pattern": "^[a-z2-7]{16}$"},
                "sandbox": {"type": "string"},
                "address": {**_ADDRESS, "description": "The sandbox address the tunnel forwards to."},
                "port": _PORT,
                "label": {"type": ["string", "null"]},
                "url": {"type": "string", "description": "https://<id>.<tunnel domain>/"},
                "password_protected": {"type": "boolean"},
                "rewrite_host": {"type": "boolean"},
                "created_at": {"type": "string", "format": "date-time"},
                "expires_at": {"type": "string", "format": "date-time"},
                "revoked_at": {"type": ["string", "null"], "format": "date-time"},
                "revoked_reason": {
                    "type": ["string", "null"],
                    "description": "revoked (by the API) or sandbox_deleted.",
                },
                "state": {
                    "type": "string",
                    "enum": ["active", "expired", "revoked", "sandbox_gone", "ingress_denied"],
                    "description": "sandbox_gone: the sandbox was deleted or lost the address; about to be revoked. "
                    "ingress_denied: the sandbox's ingress rules no longer permit it; not served while they do not.",
                },
            },
        },
        "TunnelList": {
            "type": "object",
            "additionalProperties": False,
            "required": ["tunnels"],
            "properties": {"tunnels": {"type": "array", "items": _ref("Tunnel")}},
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "additionalProperties": False,
            "properties": {"status": {"const": "ok"}},
        },
        "Ready": {
            "type": "object",
            "required": ["ready", "backend"],
            "additionalProperties": False,
            "properties": {"ready": {"const": True}, "backend": {"type": "string"}},
        },
    }


# --------------------------------------------------------------------------- responses

#: Codes the API itself answers with, per status (400 also carries every validation code of the parser).
ERROR_CODES: Final[dict[int, str]] = {
    400: "Invalid input. API codes: INVALID_JSON, UNKNOWN_PARAMETER, INVALID_PARAMETER, INVALID_TYPE; and every "
    "validation code of the policy parser, e.g. MISSING_FIELD, UNKNOWN_FIELD, INVALID_ID, ID_MISMATCH, "
    "INVALID_PROFILE, PROFILE_NOT_SUPPORTED, PROFILE_CONFLICT, INVALID_HOSTNAME, INVALID_CIDR, INVALID_ADDRESS, "
    "ADDRESS_OUTSIDE_SUBNETS, INVALID_PORT, INVALID_MODE, UNKNOWN_PRESET, TOO_MANY_ENTRIES, EGRESS_MODE_CONFLICT, "
    "ALLOW_PORTS_WITHOUT_CIDRS, DENY_METADATA_RANGE, EGRESS_DISABLED_WITH_RULES, OUT_OF_RANGE, "
    "BURST_BELOW_SUSTAINED, TEMPLATE_NOT_FOUND (a sandbox names a template that does not exist).",
    401: "UNAUTHENTICATED: no token, a malformed Authorization header, or an unknown token.",
    403: "INSUFFICIENT_SCOPE: the token lacks the scope in x-required-scope. HOST_NOT_ALLOWED: no tokens are "
    "configured and the request was not addressed to a loopback name.",
    404: "SANDBOX_NOT_FOUND / TEMPLATE_NOT_FOUND / BATCH_NOT_FOUND.",
    409: "Conflict with the stored state.",
    413: "BODY_TOO_LARGE: the body is over 1 MiB.",
    415: "UNSUPPORTED_MEDIA_TYPE: the body is not sent as application/json.",
    500: "INTERNAL: an unexpected error; the gateway logged the details.",
    503: "The policy store is not available (POLICY_FILE_INVALID: the policy file cannot be parsed; Redis down).",
}


def _error_response(status: int, description: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description or ERROR_CODES[status],
        "content": {JSON: {"schema": _ref("Error")}},
    }
    if status == 401:
        response["headers"] = {
            "WWW-Authenticate": {"schema": {"type": "string"}, "description": 'Bearer realm="gateway"'}
        }
    return response


def _ok(status: int, schema: str, description: str, **headers: str) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": _ref(schema)}}}
    if headers:
        response["headers"] = {
            name: {"schema": {"type": "string"}, "description": text} for name, text in headers.items()
        }
    return response


def _responses(ok: dict[int, dict[str, Any]], *errors: int, public: bool = False, **special: str) -> dict[str, Any]:
    """Success answers plus the error answers: every route may answer 400 (e.g. an unknown query parameter)
    and 500; authenticated routes add 401 and 403."""
    codes = set(errors) | {400, 500} | (set() if public else {401, 403})
    out: dict[str, Any] = {str(status): body for status, body in ok.items()}
    for status in sorted(codes):
        out[str(status)] = _error_response(status, special.get(f"e{status}"))
    return out


def _body(schema: str, examples: dict[str, Any], media: str = JSON) -> dict[str, Any]:
    content = {"schema": _ref(schema), "examples": {name: {"value": value} for name, value in examples.items()}}
    return {"required": True, "content": {media: content}}


# ------------------------------------------------------------ examples (the tests run them through the real parser)

SANDBOX_EXAMPLES: Final[dict[str, Any]] = {
    "allowlisted": {
        "id": "agent-7",
        "addresses": ["10.75.0.7"],
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["api.github.com", "*.example.com"], "presets": ["ai-apis"], "host_ports": [443]},
        "limits": {"bandwidth_mbit": 50},
        "labels": {"team": "research"},
    },
    "registry": {"id": "builder-1", "addresses": ["10.75.0.8"], "profile": "registry"},
    "unrestricted_minus_private": {
        "id": "scraper-2",
        "addresses": ["10.75.0.9", "fdd4:1476:6c7e::9"],
        "profile": "unrestricted",
        "egress": {"deny_cidrs": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]},
    },
    "cidr_rules": {
        "id": "dns-only",
        "addresses": ["10.75.0.10"],
        "profile": "allowlisted",
        "egress": {"mode": "deny_all", "allow_cidrs": ["1.1.1.1/32", "1.0.0.1/32"], "allow_ports": [443]},
    },
    "shorthand_list": {
        "id": "ws-target",
        "addresses": ["10.75.0.11"],
        "profile": "allowlisted",
        "egress": ["api.openai.com", "registry.npmjs.org", "10.0.0.0/8"],
        "ingress": {"sources": ["10.0.0.0/8"], "ports": [80, 443], "public_access": False},
        "private_links": ["ws-agent"],
    },
    "isolated": {"id": "untrusted-eval", "addresses": ["10.75.0.12"]},
}

SANDBOX_PATCH_EXAMPLES: Final[dict[str, Any]] = {
    "add_hosts": {"egress": {"allow_hosts": ["api.github.com", "pypi.org"]}},
    "drop_own_limits": {"limits": None},
    "relabel": {"labels": {"team": "platform"}},
}

TEMPLATE_EXAMPLES: Final[dict[str, Any]] = {
    "secure_python": {
        "name": "secure-python",
        "description": "Internet minus RFC 1918, for deny_all sandboxes with CIDR rules",
        "egress": {
            "mode": "deny_all",
            "allow_cidrs": ["0.0.0.0/0"],
            "deny_cidrs": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
        },
    },
    "ai_agent": {
        "name": "ai-agent",
        "description": "Git hosts and AI APIs",
        "egress": {"presets": ["git-hosts", "ai-apis"]},
        "limits": {"connections_per_minute": 300},
    },
}


TUNNEL_EXAMPLES: Final[dict[str, Any]] = {
    "public_preview": {"port": 3000, "label": "Web Server"},
    "password_protected": {"port": 8080, "label": "Admin UI", "password": "correct horse battery", "ttl": 3600},
    "vite_dev_server": {"port": 5173, "rewrite_host": True},
}

# --------------------------------------------------------------------------- paths

_ID = {"name": "id", "in": "path", "required": True, "schema": _IDENT, "description": "Sandbox id."}
_TUNNEL_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[a-z2-7]{16}$"},
    "description": "Tunnel id (the first label of its URL).",
}
_NAME = {"name": "name", "in": "path", "required": True, "schema": _IDENT, "description": "Template name."}
_BATCH = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": BATCH_NAME_PATTERN.pattern},
    "description": "A batch name from the listing: {ts_us}-{pid}.ndjson.",
}
_AUDIT_DISABLED = "AUDIT_DISABLED: the gateway runs without a flow log."
_TUNNELS_DISABLED = (
    "TUNNELS_DISABLED: this API was started without the tunnel service. Also STORE_UNAVAILABLE / STORE_WRITE_FAILED."
)
_PUBLIC: Final[list[Any]] = []  # `security: []`: no token needed


def _op(action: str, summary: str, scope: str, responses: dict[str, Any], tags: str, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": action, "summary": summary, "tags": [tags], "x-required-scope": scope}
    if scope == "public":
        op["security"] = _PUBLIC
    op.update(extra)
    op["responses"] = responses
    return op


def _paths() -> dict[str, Any]:
    profile_scope = (
        "A sandbox whose profile (the stored one, and the one the body names) is not isolated also needs scope "
        "network:<profile>; without it the answer is 403 NETWORK_PROFILE_DENIED, before the body is validated, "
        "and nothing is written."
    )
    e403_sandbox_write = ERROR_CODES[403] + " NETWORK_PROFILE_DENIED: the token lacks network:<profile>."
    return {
        "/healthz": {
            "get": _op(
                "healthz", "Liveness", "public", _responses({200: _ok(200, "Health", "Alive.")}, public=True), "service"
            ),
        },
        "/readyz": {
            "get": _op(
                "readyz",
                "Readiness: the policy store has loaded and, with the data plane, it all serves",
                "public",
                _responses(
                    {200: _ok(200, "Ready", "The store is loaded; the engine, its workers and DNS listen; steered.")},
                    503,
                    public=True,
                    e503="STORE_NOT_READY: the policy store has not loaded yet. DATA_PLANE_NOT_READY: the message "
                    "names each part that does not serve yet (the egress engine or a worker not listening, the DNS "
                    "interceptor not listening, the steering table not applied).",
                ),
                "service",
            ),
        },
        "/openapi.json": {
            "get": _op(
                "openapi",
                "This document",
                "public",
                _responses(
                    {
                        200: {
                            "description": "The OpenAPI 3.1 document.",
                            "content": {JSON: {"schema": {"type": "object"}}},
                        }
                    },
                    public=True,
                ),
                "service",
            ),
        },
        "/v1/status": {
            "get": _op(
                "status",
                "Store backend, readiness, counts and rejected outside records",
                "sandboxes:read",
                _responses({200: _ok(200, "Status", "The store's status.")}),
                "service",
            ),
        },
        "/v1/presets": {
            "get": _op(
                "presets.list",
                "Built-in and configured presets",
                "authenticated",
                _responses({200: _ok(200, "PresetList", "Every preset, by name.")}),
                "presets",
                description="Any valid token may read the presets.",
            ),
        },
        "/v1/sandboxes": {
            "get": _op(
                "sandboxes.list",
                "List sandboxes",
                "sandboxes:read",
                _responses({200: _ok(200, "SandboxList", "Sandboxes sorted by id.")}, 400),
                "sandboxes",
                parameters=[
                    {
                        "name": "profile",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": list(PROFILES)},
                    },
                    {"name": "template", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
            ),
            "post": _op(
                "sandboxes.create",
                "Create a sandbox",
                "sandboxes:write",
                _responses(
                    {201: _ok(201, "Sandbox", "Created.", Location="/v1/sandboxes/{id}")},
                    400,
                    409,
                    413,
                    415,
                    503,
                    e403=e403_sandbox_write,
                    e409="SANDBOX_EXISTS: the id is taken. ADDRESS_IN_USE: an address belongs to another sandbox.",
                ),
                "sandboxes",
                description=profile_scope,
                requestBody=_body("SandboxCreate", SANDBOX_EXAMPLES),
            ),
        },
        "/v1/sandboxes/{id}": {
            "parameters": [_ID],
            "get": _op(
                "sandboxes.get",
                "Get a sandbox",
                "sandboxes:read",
                _responses({200: _ok(200, "Sandbox", "The record.")}, 400, 404),
                "sandboxes",
            ),
            "put": _op(
                "sandboxes.replace",
                "Replace a sandbox (it must exist; create with POST)",
                "sandboxes:write",
                _responses(
                    {200: _ok(200, "Sandbox", "Replaced.")},
                    400,
                    404,
                    409,
                    413,
                    415,
                    503,
                    e403=e403_sandbox_write,
                    e409="PROFILE_IMMUTABLE: the profile differs from the stored one. ADDRESS_IN_USE.",
                ),
                "sandboxes",
                description=profile_scope,
                requestBody=_body(
                    "SandboxReplace",
                    {name: {k: v for k, v in record.items() if k != "id"} for name, record in SANDBOX_EXAMPLES.items()},
                ),
            ),
            "patch": _op(
                "sandboxes.patch",
                "Change a sandbox with a JSON merge patch (RFC 7396)",
                "sandboxes:write",
                _responses(
                    {200: _ok(200, "Sandbox", "The record after the patch.")},
                    400,
                    404,
                    409,
                    413,
                    415,
                    503,
                    e403=e403_sandbox_write,
                    e409="PROFILE_IMMUTABLE: the patch changes the profile. ADDRESS_IN_USE.",
                ),
                "sandboxes",
                description="The patch is applied to the stored record and the result validated as a whole. "
                "Send it as application/merge-patch+json (application/json is accepted too). " + profile_scope,
                requestBody={
                    "required": True,
                    "content": {
                        media: {
                            "schema": _ref("SandboxPatch"),
                            "examples": {k: {"value": v} for k, v in SANDBOX_PATCH_EXAMPLES.items()},
                        }
                        for media in (MERGE_PATCH, JSON)
                    },
                },
            ),
            "delete": _op(
                "sandboxes.delete",
                "Delete a sandbox",
                "sandboxes:write",
                _responses(
                    {204: {"description": "Deleted; its traffic is refused from now on."}},
                    400,
                    404,
                    503,
                    e403=e403_sandbox_write,
                ),
                "sandboxes",
                description=profile_scope,
            ),
        },
        "/v1/sandboxes/{id}/policy": {
            "parameters": [_ID],
            "get": _op(
                "sandboxes.policy",
                "The effective compiled policy",
                "sandboxes:read",
                _responses({200: _ok(200, "EffectivePolicy", "What the data plane enforces.")}, 400, 404),
                "sandboxes",
            ),
        },
        "/v1/sandboxes/{id}/explain": {
            "parameters": [_ID],
            "get": _op(
                "sandboxes.explain",
                "Would this connection be allowed, and by which rule?",
                "sandboxes:read",
                _responses(
                    {200: _ok(200, "Explain", "The verdict (allowed or not: both are 200).")},
                    400,
                    404,
                    e400="INVALID_PORT, INVALID_ADDRESS, INVALID_HOSTNAME, INVALID_PROTOCOL, "
                    "MISSING_FIELD (neither host nor address; tcp/udp without a port), UNKNOWN_PARAMETER.",
                ),
                "sandboxes",
                parameters=[
                    {
                        "name": "host",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "The name (TLS SNI / HTTP Host / DNS question), optionally with the port: "
                        "name, name:port, [v6]:port. An address here means a connection that carries no name.",
                    },
                    {
                        "name": "port",
                        "in": "query",
                        "required": False,
                        "schema": _PORT,
                        "description": "Default: 443 for tls, 80 for http; required for tcp and udp.",
                    },
                    {
                        "name": "address",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "The destination address, for CIDR rules.",
                    },
                    {
                        "name": "protocol",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": list(PROTOCOLS), "default": "tls"},
                        "description": "dns asks whether the name would resolve (decided on the name alone).",
                    },
                ],
            ),
        },
        "/v1/sandboxes/{id}/dns-log": {
            "parameters": [_ID],
            "get": _op(
                "dns.log",
                "The sandbox's recent DNS queries, oldest first",
                "audit:read",
                _responses(
                    {200: _ok(200, "DnsLog", "The last `limit` queries the interceptor answered for this sandbox.")},
                    400,
                    404,
                    503,
                    e400="INVALID_PARAMETER (limit), UNKNOWN_PARAMETER.",
                    e404="SANDBOX_NOT_FOUND.",
                    e503="DNS_DISABLED: the gateway runs without the data plane (gateway run --data-plane).",
                ),
                "audit",
                description="The per-sandbox query log: name, type, answer or rcode, latency, and whether "
                "the policy allowed it and why. Kept in memory (dns.query_log_size per sandbox); every query is "
                "also a flow record in the audit batches.",
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    }
                ],
            ),
        },
        "/v1/sandboxes/{id}/audit-batches": {
            "parameters": [_ID],
            "get": _op(
                "audit.list",
                "List the sandbox's flow record batches, oldest first",
                "audit:read",
                _responses(
                    {200: _ok(200, "AuditBatchList", "One page of batches in chronological order.")},
                    400,
                    404,
                    503,
                    e400="INVALID_PARAMETER (since_us, limit), INVALID_CONTINUATION_TOKEN, UNKNOWN_PARAMETER.",
                    e404="SANDBOX_NOT_FOUND: no such sandbox and no batches for that id.",
                    e503=_AUDIT_DISABLED,
                ),
                "audit",
                description="Audit batches: NDJSON files named {ts_us}-{pid}.ndjson whose lexical order "
                "is chronological. Follow next_continuation_token until it is null. Batches outlive the sandbox's "
                "record: a deleted sandbox's batches stay listable.",
                parameters=[
                    {
                        "name": "since_us",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0, "default": 0},
                        "description": "Only batches whose first record was written at or after this time "
                        "(µs since the epoch).",
                    },
                    {
                        "name": "continuation_token",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Opaque; from the previous page.",
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": 100},
                    },
                ],
            ),
        },
        "/v1/sandboxes/{id}/audit-batches/{name}": {
            "parameters": [_ID, _BATCH],
            "get": _op(
                "audit.get",
                "Fetch one batch",
                "audit:read",
                _responses(
                    {
                        200: {
                            "description": "NDJSON: one FlowRecord (see components.schemas.FlowRecord) per line.",
                            "content": {NDJSON: {"schema": {"type": "string"}}},
                        }
                    },
                    400,
                    404,
                    503,
                    e400="INVALID_BATCH_NAME: not a {ts_us}-{pid}.ndjson name. UNKNOWN_PARAMETER.",
                    e404="SANDBOX_NOT_FOUND, BATCH_NOT_FOUND.",
                    e503=_AUDIT_DISABLED,
                ),
                "audit",
            ),
        },
        "/v1/sandboxes/{id}/tunnels": {
            "parameters": [_ID],
            "get": _op(
                "tunnels.list",
                "List the sandbox's tunnels (live and recently ended), oldest first",
                "tunnels:read",
                _responses(
                    {200: _ok(200, "TunnelList", "The tunnels; passwords are never returned.")},
                    400,
                    404,
                    503,
                    e404="SANDBOX_NOT_FOUND.",
                    e503=_TUNNELS_DISABLED,
                ),
                "tunnels",
            ),
            "post": _op(
                "tunnels.create",
                "Expose a sandbox port at a temporary HTTPS URL",
                "tunnels:write",
                _responses(
                    {201: _ok(201, "Tunnel", "Created.", Location="/v1/tunnels/{id}")},
                    400,
                    404,
                    409,
                    413,
                    415,
                    503,
                    e400="MISSING_FIELD, UNKNOWN_FIELD, INVALID_TYPE, INVALID_PORT, INVALID_LABEL, INVALID_PASSWORD, "
                    "INVALID_TTL, INVALID_JSON.",
                    e404="SANDBOX_NOT_FOUND.",
                    e403="INSUFFICIENT_SCOPE; INGRESS_PORT_NOT_ALLOWED (the port is not in the sandbox's "
                    "ingress.ports), INGRESS_PASSWORD_REQUIRED (its ingress.public_access is false and no password).",
                    e409="TOO_MANY_TUNNELS: the sandbox already has the most live tunnels allowed (20 by default).",
                    e503=_TUNNELS_DISABLED,
                ),
                "tunnels",
                description="The URL is https://<random>.<tunnel domain>/ with 80 random bits, never derived from "
                "the sandbox id. The tunnel ends at expires_at, when revoked, or when the sandbox is deleted; live "
                "connections (WebSockets and streams included) are closed then.",
                requestBody=_body("TunnelCreate", TUNNEL_EXAMPLES),
            ),
        },
        "/v1/tunnels/{id}": {
            "parameters": [_TUNNEL_ID],
            "get": _op(
                "tunnels.get",
                "Get a tunnel",
                "tunnels:read",
                _responses(
                    {200: _ok(200, "Tunnel", "The tunnel.")},
                    400,
                    404,
                    503,
                    e404="TUNNEL_NOT_FOUND.",
                    e503=_TUNNELS_DISABLED,
                ),
                "tunnels",
            ),
            "delete": _op(
                "tunnels.revoke",
                "Revoke a tunnel (idempotent); its live connections are closed on every node",
                "tunnels:write",
                _responses(
                    {200: _ok(200, "Tunnel", "The tunnel as revoked.")},
                    400,
                    404,
                    503,
                    e404="TUNNEL_NOT_FOUND.",
                    e503=_TUNNELS_DISABLED,
                ),
                "tunnels",
            ),
        },
        "/v1/templates": {
            "get": _op(
                "templates.list",
                "List templates",
                "templates:read",
                _responses({200: _ok(200, "TemplateList", "Templates sorted by name.")}),
                "templates",
            ),
            "post": _op(
                "templates.create",
                "Create a template",
                "templates:write",
                _responses(
                    {201: _ok(201, "Template", "Created.", Location="/v1/templates/{name}")},
                    400,
                    409,
                    413,
                    415,
                    503,
                    e409="TEMPLATE_EXISTS: the name is taken.",
                ),
                "templates",
                requestBody=_body("TemplateCreate", TEMPLATE_EXAMPLES),
            ),
        },
        "/v1/templates/{name}": {
            "parameters": [_NAME],
            "get": _op(
                "templates.get",
                "Get a template",
                "templates:read",
                _responses({200: _ok(200, "Template", "The record.")}, 400, 404),
                "templates",
            ),
            "put": _op(
                "templates.replace",
                "Replace a template (it must exist; create with POST)",
                "templates:write",
                _responses(
                    {200: _ok(200, "Template", "Replaced; sandboxes using it are recompiled at once.")},
                    400,
                    404,
                    413,
                    415,
                    503,
                ),
                "templates",
                requestBody=_body("TemplateReplace", TEMPLATE_EXAMPLES),
            ),
            "delete": _op(
                "templates.delete",
                "Delete a template",
                "templates:write",
                _responses(
                    {204: {"description": "Deleted."}},
                    400,
                    404,
                    409,
                    503,
                    e409="TEMPLATE_IN_USE: sandboxes still use it; the message names them.",
                ),
                "templates",
            ),
        },
    }


_DESCRIPTION = """\
Control API of the sandbox network gateway: per-sandbox egress policies, templates, presets,
and `explain`, which answers what the data plane would decide for a connection.

Authentication: `Authorization: Bearer <token>`; each operation's `x-required-scope` names the
scope it needs (`admin` implies every scope, including `audit:read`; `authenticated` means any valid token; `public`
needs none). Creating, changing or deleting a sandbox whose profile is not `isolated` also needs `network:<profile>`.
With no tokens configured the gateway only listens on loopback and admits every local caller.

Every error is `{"code", "message", "field"}`; branch on `code`. Request bodies are JSON
(`Content-Type: application/json`) of at most 1 MiB. Unknown routes answer 404 `NOT_FOUND`,
wrong methods 405 `METHOD_NOT_ALLOWED` (with `Allow`), both with the same error body.
"""


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may change it)."""
    return copy.deepcopy(_DOCUMENT)


_DOCUMENT: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {"title": "Sandbox gateway control API", "version": __version__, "description": _DESCRIPTION},
    "security": [{"bearer": []}],
    "tags": [
        {"name": "service", "description": "Health, readiness, status, this document."},
        {"name": "sandboxes", "description": "Sandbox policies."},
        {"name": "templates", "description": "Shared defaults sandboxes inherit."},
        {"name": "presets", "description": "Named host lists."},
        {"name": "tunnels", "description": "Temporary HTTPS URLs for sandbox ports."},
        {"name": "audit", "description": "Flow record batches (metadata of every connection, never payload)."},
    ],
    "paths": _paths(),
    "components": {
        "schemas": _schemas(),
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API token from [[api.tokens]] in the gateway configuration.",
            }
        },
    },
}
