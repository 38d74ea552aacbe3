"""The control API's OpenAPI 3.1 document, generated from what the code itself uses (served at `/openapi.json`).

Each fact has one home, and this module only assembles: `paths` comes from the API's route table
(`gateway.api.route_specs`: method, path, scope, operation id, summary, request body and examples, answers per
status); the request schemas of sandboxes, templates and tunnels from the tables their parsers check field
names against (`gateway.policy`, `gateway.tunnel.model.REQUEST_SCHEMA`: names, types, limits, enums); every
answer a component builds from the typed record its producer fills (`gateway.schema.record_schema`: the
store's status, the steering's, the DNS query log's entry, the tunnel's public view, the flow record, audit
batches, presets, verdicts and effective policies, errors and rejections), with each field's documentation on
the field itself. What is left here is the API's own wrapping: listings, the fields the API adds to an answer
(status's `auth`, explain's question and policy), health and readiness, and the stored sandbox's references
to the request components.

Kept true by tests: every route the app registers is documented with the same methods and required scope
(`x-required-scope`), every documented route exists, the example request bodies pass the real parser, the
request schemas list exactly the fields the parser accepts, and the API's actual answers in the test suite
validate against the response schemas for their status.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway import __version__
from gateway.decision import ChainStep, ExplainRequest, PolicyView, VerdictView
from gateway.errors import ErrorBody
from gateway.flowlog import BATCH_NAME_PATTERN, DENIAL_ID_PATTERN, MAX_LIST_LIMIT, BatchInfo, FlowRecord
from gateway.nft import SteeringStatus
from gateway.policy import (
    CREDENTIAL_SCHEMA,
    EGRESS_SCHEMA,
    HEADER_MATCH_SCHEMA,
    ID_SCHEMA,
    INGRESS_SCHEMA,
    INSPECT_SCHEMA,
    LIMITS_SCHEMA,
    PRIVATE_LINK_SCHEMA,
    SANDBOX_SCHEMA,
    TEMPLATE_SCHEMA,
    nullable,
    schema_ref,
)
from gateway.presets import PresetView
from gateway.querylog import DnsQuery
from gateway.replay import PolicyDiff
from gateway.revisions import HISTORY_SIZE, REVISION_PATTERN, Revision
from gateway.schema import object_schema, record_schema
from gateway.state import Rejection
from gateway.stores.base import StoreStatus
from gateway.suggest import PolicySuggestion
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


def _list_of(key: str, item: str, **limits: int) -> dict[str, Any]:
    """A `{key: [item, ...]}` answer, the shape of every listing."""
    return object_schema({key: {"type": "array", "items": schema_ref(item), **limits}}, [key])


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
    revision = {"type": "string", "pattern": REVISION_PATTERN.pattern}
    # A record read from the API and sent back carries its revision: a replace or patch then goes through only
    # while that revision is still in force (REVISION_CONFLICT otherwise); a create ignores it.
    sent_revision = {
        **revision,
        "description": "Optional: the revision the record was read at (as GET answered); the write is refused with "
        "REVISION_CONFLICT when another is in force by now.",
    }
    # The API's own part of two answers: /v1/status adds how it admits callers and, with the data plane, the
    # steering's status; explain adds the sandbox, the question and the policy to the verdict.
    status = record_schema(StoreStatus, closed=False)
    status["properties"] |= {
        "auth": {
            "type": "string",
            "enum": ["tokens", "open-loopback"],
            "description": "open-loopback: no tokens configured, so the API listens on loopback only and admits "
            "every local caller.",
        },
        "data_plane": record_schema(SteeringStatus),
    }
    http = {
        "allowed": {"type": "boolean"},
        "reason": {"type": "string", "description": "The entry's deny_reason when it has one and refuses."},
        "failed": {"type": "string", "description": "method, path, or empty when allowed."},
        "header_conditions": {
            "type": "array",
            "items": schema_ref("HeaderMatch"),
            "description": "The entry's header conditions, which the request must also meet (explain takes no "
            "headers).",
        },
    }
    status["required"].append("auth")
    explain = record_schema(VerdictView)
    explain["properties"] |= {
        "sandbox": {"type": "string"},
        "request": record_schema(ExplainRequest),
        "chain": {
            "type": "array",
            "items": record_schema(ChainStep),
            "description": "The precedence chain: each rule looked at, in the order decide applies them, with what "
            "it found; the last one decided.",
        },
        "policy": schema_ref("EffectivePolicy"),
        "http": nullable(
            object_schema(
                http,
                http,
                "Only when method or path was asked: the inspection tier's decision of that request, for a host "
                "an inspect entry marks (then `allowed` and `reason` above include it); null when no entry marks "
                "the connection, whose verdict then decides every request on it.",
            )
        ),
    }
    explain["required"] = [name for name in explain["properties"] if name != "http"]
    explain["description"] = "The verdict the data plane would give this connection, and the policy it used."
    error = record_schema(ErrorBody)
    rejection = record_schema(Rejection, without=["error"], closed=False)
    rejection["properties"] |= error["properties"]  # the refusal's code, message and field, as in an error answer
    rejection["required"] = list(rejection["properties"])
    return {
        "Error": error,
        "Egress": object_schema(
            EGRESS_SCHEMA, (), "Fields left out (or null) are inherited from the template, then the profile."
        ),
        "InspectEntry": object_schema(INSPECT_SCHEMA, ["hosts"]),
        "HeaderMatch": object_schema(HEADER_MATCH_SCHEMA, ["name"]),
        "Credential": object_schema(CREDENTIAL_SCHEMA, ["header", "secret"]),
        "Ingress": object_schema(INGRESS_SCHEMA),
        "Limits": object_schema(LIMITS_SCHEMA),
        "PrivateLink": object_schema(PRIVATE_LINK_SCHEMA, ["source"]),
        "Sandbox": object_schema(
            {
                **stored_sandbox,
                "revision": {
                    **revision,
                    "readOnly": True,
                    "description": "The revision of its policy in force: the content id of this record and its "
                    "template's, the same on every node (not stored).",
                },
            },
            [*SANDBOX_SCHEMA, "revision"],
            "A sandbox record as stored (only set egress and limits fields appear), with its revision.",
        ),
        "SandboxCreate": object_schema(
            {**SANDBOX_SCHEMA, "revision": {**revision, "description": "Ignored (a record copied from a GET)."}},
            ["id", "addresses"],
        ),
        "SandboxReplace": object_schema(
            {**SANDBOX_SCHEMA, "revision": sent_revision},
            ["addresses"],
            "The whole record; `id` may be left out and must match the URL when given.",
        ),
        "SandboxPatch": object_schema(
            {**{name: {} for name in SANDBOX_SCHEMA}, "revision": sent_revision},
            (),
            "A JSON merge patch (RFC 7396): objects merge, null removes a field, anything else replaces it. The "
            "result is validated as a whole record.",
        ),
        "SandboxList": _list_of("sandboxes", "Sandbox"),
        "Revision": record_schema(Revision),
        "RevisionList": object_schema(
            {
                "sandbox": {"type": "string"},
                "revision": {**revision, "description": "The revision in force."},
                "revisions": {"type": "array", "items": schema_ref("Revision"), "maxItems": HISTORY_SIZE},
            },
            ["sandbox", "revision", "revisions"],
            "The sandbox's last distinct revisions, newest (the one in force) first; one accepted again moves to "
            "the front.",
        ),
        "RestoreRequest": object_schema(
            {"revision": {**revision, "description": "Which revision's record to re-apply; default the previous."}},
            (),
        ),
        "Template": object_schema(
            {**TEMPLATE_SCHEMA, "egress": schema_ref("Egress"), "limits": schema_ref("Limits")}, TEMPLATE_SCHEMA
        ),
        "TemplateCreate": object_schema(TEMPLATE_SCHEMA, ["name"]),
        "TemplateReplace": object_schema(
            TEMPLATE_SCHEMA, (), "The whole template; `name` may be left out and must match the URL when given."
        ),
        "TemplateList": _list_of("templates", "Template"),
        "Preset": record_schema(PresetView),
        "PresetList": _list_of("presets", "Preset"),
        "EffectivePolicy": record_schema(PolicyView),
        "Verdict": record_schema(VerdictView, closed=False),
        "Explain": explain,
        "Rejection": rejection,
        "Status": status,
        "AuditBatch": record_schema(BatchInfo),
        "AuditBatchList": object_schema(
            {
                "batches": {"type": "array", "items": schema_ref("AuditBatch"), "maxItems": MAX_LIST_LIMIT},
                "next_continuation_token": {
                    **_NULLABLE_STRING,
                    "description": "Pass as continuation_token for the next page; null: this was the last page.",
                },
            },
            ["batches", "next_continuation_token"],
        ),
        "FlowRecord": record_schema(
            FlowRecord, "One line of an audit batch: one connection's metadata (never payload or credentials)."
        ),
        "DnsQuery": record_schema(DnsQuery),
        "PolicyDiff": record_schema(PolicyDiff),
        "PolicySuggestion": record_schema(PolicySuggestion),
        "DnsLog": _list_of("queries", "DnsQuery"),
        "TunnelCreate": object_schema(tunnel_model.REQUEST_SCHEMA, ["port"]),
        "Tunnel": record_schema(tunnel_model.TunnelView),
        "TunnelList": _list_of("tunnels", "Tunnel"),
        "Health": object_schema({"status": {"const": "ok"}}, ["status"]),
        "Ready": object_schema({"ready": {"const": True}, "backend": {"type": "string"}}, ["ready", "backend"]),
    }


# --------------------------------------------------------------------------- paths

#: What each status means when the route adds nothing (400 also carries every validation code of the parser).
ERROR_CODES: Final[Mapping[int, str]] = {
    400: "Invalid input. API codes: INVALID_JSON, UNKNOWN_PARAMETER, INVALID_PARAMETER, INVALID_TYPE, "
    "INVALID_REVISION (a sandbox record's `revision` is not a revision id); and every "
    "validation code of the policy parser, e.g. MISSING_FIELD, UNKNOWN_FIELD, INVALID_ID, ID_MISMATCH, "
    "INVALID_PROFILE, PROFILE_NOT_SUPPORTED, PROFILE_CONFLICT, INVALID_HOSTNAME, INVALID_CIDR, INVALID_ADDRESS, "
    "ADDRESS_OUTSIDE_SUBNETS, INVALID_PORT, INVALID_MODE, UNKNOWN_PRESET, TOO_MANY_ENTRIES, EGRESS_MODE_CONFLICT, "
    "ALLOW_PORTS_WITHOUT_CIDRS, ALLOW_METADATA_ENDPOINT, DENY_METADATA_RANGE, EGRESS_DISABLED_WITH_RULES, "
    "OUT_OF_RANGE, BURST_BELOW_SUSTAINED, TEMPLATE_NOT_FOUND (a sandbox names a template that does not exist); "
    "and the operator's [invariants]: INVARIANT_VIOLATED (the record grants what a never_reach assertion forbids), "
    "CEILING_EXCEEDED (it widens beyond its ceiling template), CEILING_TEMPLATE_NOT_FOUND.",
    401: "UNAUTHENTICATED: no token, a malformed Authorization header, or an unknown token.",
    403: "INSUFFICIENT_SCOPE: the token lacks the scope in x-required-scope. HOST_NOT_ALLOWED: no tokens are "
    "configured and the request was not addressed to a loopback name.",
    404: "SANDBOX_NOT_FOUND / TEMPLATE_NOT_FOUND / BATCH_NOT_FOUND. A sandbox outside the sandboxes a token is "
    "limited to answers as one that does not exist.",
    409: "Conflict with the stored state.",
    413: "BODY_TOO_LARGE: the body is over 1 MiB.",
    415: "UNSUPPORTED_MEDIA_TYPE: the body is not sent as application/json.",
    500: "INTERNAL: an unexpected error; the gateway logged the details.",
    503: "The policy store is not available (POLICY_FILE_INVALID: the policy file cannot be parsed; Redis down).",
}

#: Path parameters, by the segment they follow: `/v1/sandboxes/{id}` is a sandbox id wherever it appears.
PATH_PARAMETERS: Final[Mapping[tuple[str, str], tuple[Mapping[str, Any], str]]] = {
    ("sandboxes", "id"): (ID_SCHEMA, "Sandbox id."),
    ("tunnels", "id"): (tunnel_model.ID_SCHEMA, "Tunnel id (the first label of its URL)."),
    ("templates", "name"): (ID_SCHEMA, "Template name."),
    ("audit-batches", "name"): (
        {"type": "string", "pattern": BATCH_NAME_PATTERN.pattern},
        "A batch name from the listing: {ts_us}-{pid}.ndjson.",
    ),
    ("denials", "id"): (
        {"type": "string", "pattern": f"^{DENIAL_ID_PATTERN.pattern}$"},
        "A denial id, as the sandbox was told it (X-Gateway-Denial-Id, a DNS answer's EDE text).",
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
                    "description": "An API token from [[api.tokens]] in the gateway configuration. A token with "
                    "`sandboxes` sees and acts on those sandboxes only: others answer 404 as if absent, lists and "
                    "the flow stream leave them out.",
                }
            },
        },
    }
