"""The control API's OpenAPI 3.1 document, generated from what the code itself uses (served at `/openapi.json`).

Each fact has one home, and this module only assembles: `paths` comes from the API's route table
(`gateway.api.route_specs`: method, path, scope, operation id, summary, request body and examples, answers per
status); the request schemas of sandboxes and templates from the tables the policy parser checks field names
against (`gateway.policy`: names, types, limits, enums); the flow record from `gateway.flowlog.FlowRecord`'s
fields and types; the tunnel request from `gateway.tunnel.model`'s field list and limits. What is left here
is documentation only: descriptions, and the shapes of answers no parser reads back (status, explain, ...).

Kept true by tests: every route the app registers is documented with the same methods and required scope
(`x-required-scope`), every documented route exists, the example request bodies pass the real parser, the
request schemas list exactly the fields the parser accepts, and the API's actual answers in the test suite
validate against the response schemas for their status.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway import __version__
from gateway.decision import PROTOCOLS
from gateway.errors import ErrorBody
from gateway.flowlog import BATCH_NAME_PATTERN, FIELD_NAMES, MAX_LIST_LIMIT, FlowRecord
from gateway.policy import (
    ADDRESS_SCHEMA,
    EGRESS_MODES,
    EGRESS_SCHEMA,
    HOSTNAME_SCHEMA,
    ID_SCHEMA,
    INGRESS_SCHEMA,
    LIMIT_RANGES,
    LIMITS_SCHEMA,
    PORT_SCHEMA,
    PRIVATE_LINK_SCHEMA,
    PROFILES,
    SANDBOX_SCHEMA,
    TEMPLATE_SCHEMA,
    schema_ref,
)
from gateway.state import Rejection
from gateway.tunnel import model as tunnel_model

JSON: Final = "application/json"
NDJSON: Final = "application/x-ndjson"
MERGE_PATCH: Final = "application/merge-patch+json"


@dataclass(frozen=True, slots=True)
class Answer:
    """One documented success answer: `schema` is a component name, an inline schema, or None (no body)."""

    description: str
    schema: str | Mapping[str, Any] | None = None
    media: str = JSON
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Body:
    """A request body: its component schema, the examples (which the tests run through the real parser)."""

    schema: str
    examples: Mapping[str, Any]
    media: tuple[str, ...] = (JSON,)


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    schema: Mapping[str, Any]
    description: str | None = None


class Route(typing.Protocol):
    """What the generator reads from a route of the API's table (`gateway.api.RouteSpec`)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def scope(self) -> str: ...
    @property
    def public(self) -> bool: ...
    @property
    def action(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def tag(self) -> str: ...
    @property
    def ok(self) -> Mapping[int, Answer]: ...
    @property
    def errors(self) -> Mapping[int, str | None]: ...
    @property
    def body(self) -> Body | None: ...
    @property
    def query(self) -> tuple[Query, ...]: ...
    @property
    def description(self) -> str | None: ...


def _object(
    properties: Mapping[str, Any], required: Iterable[str] = (), description: str | None = None, *, closed: bool = True
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": dict(properties)}
    if required := list(required):
        schema["required"] = required
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def _list_of(key: str, item: str, **limits: int) -> dict[str, Any]:
    """A `{key: [item, ...]}` answer, the shape of every listing."""
    return _object({key: {"type": "array", "items": schema_ref(item), **limits}}, [key])


def _json_type(annotation: Any) -> dict[str, Any]:
    """The JSON Schema of a record field's Python type (int, float, str, bool, a Literal of strings, X | None)."""
    if typing.get_origin(annotation) is typing.Literal:
        return {"type": "string", "enum": list(typing.get_args(annotation))}
    if isinstance(annotation, types.UnionType):
        inner = [_json_type(arg)["type"] for arg in typing.get_args(annotation) if arg is not type(None)]
        return {"type": [*inner, "null"]}
    return {"type": {int: "integer", float: "number", str: "string", bool: "boolean"}[annotation]}


def _fields(record: type, notes: Mapping[str, Mapping[str, Any]], without: str = "") -> dict[str, Any]:
    """A dataclass's fields, in order, as JSON Schema properties from their types, with `notes` added."""
    hints = typing.get_type_hints(record)
    return {
        f.name: {**_json_type(hints[f.name]), **notes.get(f.name, {})}
        for f in dataclasses.fields(record)
        if f.name != without
    }


#: Documentation of the flow record's fields; names and types come from FlowRecord itself.
_FLOW_NOTES: Final[Mapping[str, Mapping[str, Any]]] = {
    "start_us": {"description": "µs since the epoch."},
    "end_us": {"description": "µs since the epoch."},
    "src_addr": ADDRESS_SCHEMA,
    "dst_addr": {**ADDRESS_SCHEMA, "description": "The address the gateway dialled."},
    "orig_dst_addr": {**ADDRESS_SCHEMA, "description": "The destination the sandbox asked for."},
    "hostname": {"description": "TLS SNI or HTTP Host."},
    "bytes_up": {"minimum": 0},
    "bytes_down": {"minimum": 0},
    "duration_ms": {"minimum": 0},
    "method": {"description": "An inspected HTTP request's method (null in a connection's record)."},
    "path": {"description": "An inspected HTTP request's path, without the query."},
    "status": {"description": "The status answered to an inspected HTTP request."},
}

#: Documentation of the tunnel request's fields; the names are the model's REQUEST_FIELDS, the limits its own.
_TUNNEL_REQUEST: Final[Mapping[str, Mapping[str, Any]]] = {
    "port": {**PORT_SCHEMA, "description": "The port inside the sandbox to expose (plain HTTP there)."},
    "label": {"type": "string", "minLength": 1, "maxLength": tunnel_model.MAX_LABEL, "description": "For people only."},
    "password": {
        "type": "string",
        "minLength": tunnel_model.MIN_PASSWORD,
        "maxLength": tunnel_model.MAX_PASSWORD,
        "writeOnly": True,
        "description": "Protects the tunnel (login page, or HTTP Basic with any user name). Stored as an scrypt "
        "hash; never returned or logged.",
    },
    "ttl": {
        "type": "number",
        "minimum": tunnel_model.MIN_TTL,
        "description": "Seconds until the tunnel expires (default and maximum: [tunnel] default_ttl, max_ttl).",
    },
    "rewrite_host": {
        "type": "boolean",
        "default": False,
        "description": "Send Host: localhost:<port> upstream, for dev servers that check Host.",
    },
}

_TUNNEL_ID: Final = {"type": "string", "pattern": tunnel_model.ID_PATTERN.pattern}
_NULLABLE_STRING: Final = {"type": ["string", "null"]}


def _schemas() -> dict[str, Any]:
    stored_sandbox = {
        **SANDBOX_SCHEMA,
        "template": _NULLABLE_STRING,
        "egress": schema_ref("Egress"),
        "ingress": schema_ref("Ingress"),
        "limits": schema_ref("Limits"),
        "private_links": {"type": "array", "items": schema_ref("PrivateLink")},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    }
    tunnel = {
        "id": _TUNNEL_ID,
        "sandbox": {"type": "string"},
        "address": {**ADDRESS_SCHEMA, "description": "The sandbox address the tunnel forwards to."},
        "port": PORT_SCHEMA,
        "label": _NULLABLE_STRING,
        "url": {"type": "string", "description": "https://<id>.<tunnel domain>/"},
        "password_protected": {"type": "boolean"},
        "rewrite_host": {"type": "boolean"},
        "created_at": {"type": "string", "format": "date-time"},
        "expires_at": {"type": "string", "format": "date-time"},
        "revoked_at": {**_NULLABLE_STRING, "format": "date-time"},
        "revoked_reason": {
            **_NULLABLE_STRING,
            "description": f"{tunnel_model.REVOKED_BY_API} (by the API) or {tunnel_model.REVOKED_SANDBOX_GONE}.",
        },
        "state": {
            "type": "string",
            "enum": ["active", "expired", "revoked", "sandbox_gone", "ingress_denied"],
            "description": "sandbox_gone: the sandbox was deleted or lost the address; about to be revoked. "
            "ingress_denied: the sandbox's ingress rules no longer permit it; not served while they do not.",
        },
    }
    dns_query = {
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
    }
    data_plane = {
        "steering": {"type": "boolean", "description": "Started with --steer."},
        "steering_applied": {"type": "boolean"},
        "unattached_dropped": {
            "type": "integer",
            "minimum": 0,
            "description": "Packets dropped since start-up because their source, routed to the gateway, is no "
            "sandbox's address (read every egress.unattached_log_interval).",
        },
        "unattached_recent": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Such sources seen within the last interval (at most 64).",
        },
    }
    status = {
        "backend": {"type": "string", "enum": ["embedded", "redis"]},
        "ready": {"type": "boolean"},
        "sandboxes": {"type": "integer", "minimum": 0},
        "templates": {"type": "integer", "minimum": 0},
        "rejected": {"type": "array", "items": schema_ref("Rejection")},
        "auth": {
            "type": "string",
            "enum": ["tokens", "open-loopback"],
            "description": "open-loopback: no tokens configured, so the API listens on loopback only and admits "
            "every local caller.",
        },
        "data_plane": _object(data_plane, data_plane, "Only with `gateway run --data-plane`."),
    }
    effective_limits = {name: {"type": "integer", "minimum": 1} for name in LIMIT_RANGES}
    verdict = {
        "allowed": {"type": "boolean"},
        "reason": {"type": "string", "description": "Why, for people."},
        "rule": {
            "type": "string",
            "description": "Which rule decided, e.g. `allow_hosts api.github.com`, `preset git-hosts`, "
            "`deny_cidrs 10.0.0.0/8`, `default:deny`.",
        },
    }
    asked = {
        "host": _NULLABLE_STRING,
        "address": _NULLABLE_STRING,
        "port": {"anyOf": [PORT_SCHEMA, {"type": "null"}]},
        "protocol": {"type": "string", "enum": list(PROTOCOLS)},
    }
    explain = {
        **verdict,
        "sandbox": {"type": "string"},
        "request": _object(asked, asked),
        "policy": schema_ref("EffectivePolicy"),
    }
    error = _fields(ErrorBody, {"code": {"pattern": "^[A-Z][A-Z0-9_]*$"}})
    rejection = _fields(Rejection, {"at": {"description": "Unix time of the rejection."}}, without="error")
    rejection |= error  # the refusal's code, message and field, as in an error answer
    return {
        "Error": _object(
            error,
            error,
            "Every error answer. `code` is stable; `message` is for people; `field` names the offending input (a "
            "JSON path such as egress.allow_hosts[2], a query parameter or a header) or null.",
        ),
        "Egress": _object(
            EGRESS_SCHEMA, (), "Fields left out (or null) are inherited from the template, then the profile."
        ),
        "Ingress": _object(INGRESS_SCHEMA),
        "Limits": _object(LIMITS_SCHEMA),
        "PrivateLink": _object(PRIVATE_LINK_SCHEMA, ["source"]),
        "Sandbox": _object(
            stored_sandbox, SANDBOX_SCHEMA, "A sandbox record as stored (only set egress and limits fields appear)."
        ),
        "SandboxCreate": _object(SANDBOX_SCHEMA, ["id", "addresses"]),
        "SandboxReplace": _object(
            SANDBOX_SCHEMA, ["addresses"], "The whole record; `id` may be left out and must match the URL when given."
        ),
        "SandboxPatch": _object(
            {name: {} for name in SANDBOX_SCHEMA},
            (),
            "A JSON merge patch (RFC 7396): objects merge, null removes a field, anything else replaces it. The "
            "result is validated as a whole record.",
        ),
        "SandboxList": _list_of("sandboxes", "Sandbox"),
        "Template": _object(
            {**TEMPLATE_SCHEMA, "egress": schema_ref("Egress"), "limits": schema_ref("Limits")}, TEMPLATE_SCHEMA
        ),
        "TemplateCreate": _object(TEMPLATE_SCHEMA, ["name"]),
        "TemplateReplace": _object(
            TEMPLATE_SCHEMA, (), "The whole template; `name` may be left out and must match the URL when given."
        ),
        "TemplateList": _list_of("templates", "Template"),
        "Preset": _object(
            {
                "name": {"type": "string"},
                "description": {"type": "string"},
                "hosts": {"type": "array", "items": HOSTNAME_SCHEMA},
                "ports": {
                    "anyOf": [{"type": "array", "items": PORT_SCHEMA}, {"type": "null"}],
                    "description": "null: any port.",
                },
            },
            ["name", "description", "hosts", "ports"],
        ),
        "PresetList": _list_of("presets", "Preset"),
        "EffectivePolicy": _object(
            {
                "sandbox": {"type": "string"},
                "profile": {"type": "string", "enum": list(PROFILES)},
                "allow_internet": {"type": "boolean"},
                "mode": {"type": "string", "enum": list(EGRESS_MODES)},
                "egress": schema_ref("Egress"),
                "limits": _object(effective_limits, effective_limits),
            },
            ["sandbox", "profile", "allow_internet", "mode", "egress", "limits"],
            "The compiled policy the data plane enforces: the sandbox merged over its template, capped by its "
            "profile, with the default limits filled in.",
        ),
        "Verdict": _object(verdict, verdict, closed=False),
        "Explain": _object(
            explain, explain, "The verdict the data plane would give this connection, and the policy it used."
        ),
        "Rejection": _object(
            rejection,
            rejection,
            "A record written by someone other than this API (a file edit, another service) that failed "
            "validation; the last good version stays in force until a valid one arrives.",
            closed=False,
        ),
        "Status": _object(
            status,
            [name for name in status if name != "data_plane"],
            "The policy store's state. Backends may add fields (the embedded store adds `path`).",
            closed=False,
        ),
        "AuditBatch": _object(
            {
                "name": {"type": "string", "pattern": BATCH_NAME_PATTERN.pattern},
                "size": {"type": "integer", "minimum": 0, "description": "Bytes."},
                "first_ts_us": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "When the batch's first record was written (its end_us), µs since the epoch.",
                },
            },
            ["name", "size", "first_ts_us"],
        ),
        "AuditBatchList": _object(
            {
                "batches": {"type": "array", "items": schema_ref("AuditBatch"), "maxItems": MAX_LIST_LIMIT},
                "next_continuation_token": {
                    **_NULLABLE_STRING,
                    "description": "Pass as continuation_token for the next page; null: this was the last page.",
                },
            },
            ["batches", "next_continuation_token"],
        ),
        "FlowRecord": _object(
            _fields(FlowRecord, _FLOW_NOTES),
            FIELD_NAMES,
            "One line of an audit batch: one connection's metadata (never payload or credentials).",
        ),
        "DnsQuery": _object(dns_query, dns_query),
        "DnsLog": _list_of("queries", "DnsQuery"),
        "TunnelCreate": _object({name: _TUNNEL_REQUEST[name] for name in tunnel_model.REQUEST_FIELDS}, ["port"]),
        "Tunnel": _object(
            tunnel,
            tunnel,
            "A temporary HTTPS URL for a sandbox port. Its id is the random first label of the URL.",
        ),
        "TunnelList": _list_of("tunnels", "Tunnel"),
        "Health": _object({"status": {"const": "ok"}}, ["status"]),
        "Ready": _object({"ready": {"const": True}, "backend": {"type": "string"}}, ["ready", "backend"]),
    }


# --------------------------------------------------------------------------- paths

#: What each status means when the route adds nothing (400 also carries every validation code of the parser).
ERROR_CODES: Final[Mapping[int, str]] = {
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

#: Path parameters, by the segment they follow: `/v1/sandboxes/{id}` is a sandbox id wherever it appears.
PATH_PARAMETERS: Final[Mapping[tuple[str, str], tuple[Mapping[str, Any], str]]] = {
    ("sandboxes", "id"): (ID_SCHEMA, "Sandbox id."),
    ("tunnels", "id"): (_TUNNEL_ID, "Tunnel id (the first label of its URL)."),
    ("templates", "name"): (ID_SCHEMA, "Template name."),
    ("audit-batches", "name"): (
        {"type": "string", "pattern": BATCH_NAME_PATTERN.pattern},
        "A batch name from the listing: {ts_us}-{pid}.ndjson.",
    ),
}


def _path_parameters(path: str) -> list[dict[str, Any]]:
    segments = path.strip("/").split("/")
    out = []
    for before, segment in itertools.pairwise(segments):
        if segment.startswith("{"):
            name = segment.strip("{}")
            schema, description = PATH_PARAMETERS[(before, name)]
            out.append({"name": name, "in": "path", "required": True, "schema": schema, "description": description})
    return out


def _content(schema: str | Mapping[str, Any]) -> dict[str, Any]:
    return {"schema": schema_ref(schema) if isinstance(schema, str) else dict(schema)}


def _responses(route: Route) -> dict[str, Any]:
    """The route's success answers, then its error answers: every route may answer 400 (an unknown query
    parameter, at least) and 500; authenticated routes add 401 and 403."""
    out: dict[str, Any] = {}
    for status, answer in route.ok.items():
        body: dict[str, Any] = {"description": answer.description}
        if answer.schema is not None:
            body["content"] = {answer.media: _content(answer.schema)}
        if answer.headers:
            body["headers"] = {k: {"schema": {"type": "string"}, "description": v} for k, v in answer.headers.items()}
        out[str(status)] = body
    codes = set(route.errors) | {400, 500} | (set() if route.public else {401, 403})
    for status in sorted(codes):
        error: dict[str, Any] = {
            "description": route.errors.get(status) or ERROR_CODES[status],
            "content": {JSON: _content("Error")},
        }
        if status == 401:
            error["headers"] = {
                "WWW-Authenticate": {"schema": {"type": "string"}, "description": 'Bearer realm="gateway"'}
            }
        out[str(status)] = error
    return out


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.action,
        "summary": route.summary,
        "tags": [route.tag],
        "x-required-scope": route.scope,
    }
    if route.public:
        op["security"] = []  # no token needed
    if route.description:
        op["description"] = route.description
    if route.query:
        op["parameters"] = [
            {"name": q.name, "in": "query", "required": False, "schema": dict(q.schema)}
            | ({"description": q.description} if q.description else {})
            for q in route.query
        ]
    if route.body is not None:
        examples = {name: {"value": value} for name, value in route.body.examples.items()}
        op["requestBody"] = {
            "required": True,
            "content": {media: {**_content(route.body.schema), "examples": examples} for media in route.body.media},
        }
    op["responses"] = _responses(route)
    return op


def _paths(routes: Iterable[Route]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in routes:
        item = paths.get(route.path)
        if item is None:
            item = paths[route.path] = {}
            if parameters := _path_parameters(route.path):
                item["parameters"] = parameters
        item[route.method.lower()] = _operation(route)
    return paths


_DESCRIPTION: Final = """\
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

_TAGS: Final = (
    ("service", "Health, readiness, status, this document."),
    ("sandboxes", "Sandbox policies."),
    ("templates", "Shared defaults sandboxes inherit."),
    ("presets", "Named host lists."),
    ("tunnels", "Temporary HTTPS URLs for sandbox ports."),
    ("audit", "Flow record batches (metadata of every connection, never payload)."),
)


def openapi_document(routes: Iterable[Route]) -> dict[str, Any]:
    """A fresh document for `routes` (callers may change it)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Sandbox gateway control API", "version": __version__, "description": _DESCRIPTION},
        "security": [{"bearer": []}],
        "tags": [{"name": name, "description": text} for name, text in _TAGS],
        "paths": _paths(routes),
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
