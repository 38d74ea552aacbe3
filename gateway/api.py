"""The control API (aiohttp): sandboxes, templates, presets, explain, status.

Every answer is JSON; every error is `{"code", "message", "field"}` with the HTTP
status the error carries (`GatewayError.status`), so a caller can branch on `code`
and show `message` to a person.

Authentication is `Authorization: Bearer <token>` against the configured tokens (only
SHA-256 digests are kept; comparison is constant time). Scopes: reads need
`sandboxes:read` / `templates:read`, writes `sandboxes:write` / `templates:write`,
`admin` implies every scope; flow record batches need `audit:read`; tunnels (temporary port
exposure) need `tunnels:read` / `tunnels:write`; `/metrics` needs `metrics:read`. Writing a
sandbox whose profile is not `isolated` also needs `network:<profile>`: creating one with
that profile, and replacing, patching or deleting one that has it. The scope is checked
before the record is validated (403 before 400) and before the store is touched, so a
refused caller causes no work and changes nothing.

A token may be limited to some sandboxes (`sandboxes` in its [[api.tokens]] entry); `Caller.may_see` is the one
check. A sandbox outside the caller's sandboxes answers every route exactly as a missing one (404), lists and
the flow stream leave it out, a denial or a tunnel of it is not found; creating one is 403 SANDBOX_OUT_OF_SCOPE
(before validation, like the profile's scope). Routes that describe or change the whole gateway are closed to
such a token: the configuration refuses it admin, templates:write and metrics:read, and /v1/status answers it
403 GATEWAY_WIDE_ROUTE.

With no tokens configured the API is *open*, and therefore refuses to be built
unless it listens on loopback only (`check_api_exposure`). In open mode it also
refuses requests whose Host header is not a loopback name, so a web page cannot
reach it through DNS rebinding, and every request with a body must be JSON
(`Content-Type: application/json`), which a cross-site form cannot send without a
CORS preflight that this API never grants.

Every route is declared once, in `route_specs()`: the app registers it from there, the
middleware checks its scope and its query parameter names against it, and the OpenAPI
document (`gateway.openapi`) is generated from it, with the example bodies beside it.

PUT replaces an existing record and answers 404 when there is none (create is
POST), so a typo in a URL never creates a record. PATCH on a sandbox is a JSON
merge patch (RFC 7396) applied to the stored record and validated as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.api_config import ApiToken, SandboxScope
from gateway.client import CUT_HEADER, RESTORED_HEADER, REVISION_HEADER
from gateway.decision import PROTOCOLS, ChainStep, CompiledPolicy, ExplainRequest, Verdict
from gateway.destinations import Refusal
from gateway.errors import Forbidden, GatewayError, NotFound
from gateway.flowlog import MAX_LIST_LIMIT, FlowLog, FlowVerdict, check_batch_name, check_sandbox_id, now_us
from gateway.hostnames import normalize_pattern
from gateway.inspection import decide_request
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.openapi import ERROR_CODES, JSON, MERGE_PATCH, NDJSON, Answer, Body, Query, openapi_document
from gateway.policy import DEFAULT_PROFILE, HTTP_TOKEN_PATTERN, PORT_SCHEMA, PROFILES, Sandbox
from gateway.querylog import QueryLog
from gateway.replay import DEFAULT_SINCE, MAX_SINCE_SECONDS, parse_since, replay
from gateway.revisions import HISTORY_SIZE, check_revision, find_revision
from gateway.rules import Rule
from gateway.state import AddressInUse, PolicyState
from gateway.stores.base import PolicyStore
from gateway.suggest import check_applicable, kept_record, suggest
from gateway.tunnel.store import TunnelStore
from gateway.untrusted import InvalidJson, parse_decimal, parse_json

__all__ = [
    "AUTHENTICATED",
    "MAX_BODY_BYTES",
    "PUBLIC",
    "REPLAY_LOCK_KEY",
    "SANDBOX_EXAMPLES",
    "SANDBOX_PATCH_EXAMPLES",
    "TEMPLATE_EXAMPLES",
    "TUNNEL_EXAMPLES",
    "Caller",
    "RouteSpec",
    "apply_merge_patch",
    "check_api_exposure",
    "create_app",
    "is_loopback_host",
    "parse_explain_query",
    "route_specs",
]

log = structlog.get_logger("gateway.api")

MAX_BODY_BYTES: Final = 1024 * 1024
JSON_TYPES: Final = frozenset({JSON, MERGE_PATCH})
WRITE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Route scopes that are not a token scope: PUBLIC needs no token, AUTHENTICATED any valid token.
PUBLIC: Final = "public"
AUTHENTICATED: Final = "authenticated"
#: Default ports for explain when the caller gives none; tcp/udp have no sensible default.
DEFAULT_PORTS: Final[Mapping[str, int | None]] = {"tls": 443, "http": 80, "dns": None}
#: Explain's HTTP request (for hosts an inspect entry marks): the bounds of its method and path.
MAX_EXPLAIN_METHOD: Final = 32
MAX_EXPLAIN_PATH: Final = 4096

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the token's name (never its value), its scopes and the sandboxes it is limited to (None:
    every sandbox)."""

    name: str
    scopes: frozenset[str]
    sandboxes: SandboxScope | None = None

    def has(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def may_see(self, sandbox_id: str) -> bool:
        """Whether this caller may see and act on the sandbox: the one check every route that names or returns
        sandboxes makes (a sandbox it may not see answers as one that does not exist)."""
        return self.sandboxes is None or sandbox_id in self.sandboxes


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route, declared once: what the app registers and checks, and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: Handler
    scope: str  # a token scope, PUBLIC or AUTHENTICATED
    action: str  # the name writes are logged under; also the OpenAPI operationId
    summary: str
    tag: str
    ok: Mapping[int, Answer]  # the success answers, by status
    #: Error statuses beyond the ones every route has (400, 500; 401 and 403 unless public), each with what it
    #: means here (None: the generic text). A 400 or 403 listed here only replaces that text.
    errors: Mapping[int, str | None] = dataclasses.field(default_factory=dict)
    body: Body | None = None
    query: tuple[Query, ...] = ()
    description: str | None = None

    @property
    def public(self) -> bool:
        return self.scope == PUBLIC


class ApiTokens:
    """The tokens that may call the API now: SIGHUP replaces them (`replace`) while the API serves.
    None of them: the API is open, which only a loopback address allows."""

    __slots__ = ("current", "host")

    def __init__(self, host: str, tokens: Sequence[ApiToken]) -> None:
        self.host = host
        self.current = tuple(tokens)

    def replace(self, tokens: Sequence[ApiToken]) -> None:
        """Raises CONFIG_INVALID (and keeps the current ones) when the API would be exposed without tokens."""
        check_api_exposure(self.host, tokens)
        self.current = tuple(tokens)

    @property
    def open(self) -> bool:
        return not self.current


STORE_KEY: Final = web.AppKey("store", PolicyStore)
TOKENS_KEY: Final = web.AppKey("tokens", ApiTokens)
ROUTES_KEY: Final[web.AppKey[dict[tuple[str, str], RouteSpec]]] = web.AppKey("routes")  # by (method, path)
WRITE_LOCK_KEY: Final = web.AppKey("write_lock", asyncio.Lock)
#: Held while a policy diff replays or a suggestion reads the flow log: one at a time, since their CPU is the
#: data plane's too (the GIL).
REPLAY_LOCK_KEY: Final = web.AppKey("replay_lock", asyncio.Lock)
FLOWS_KEY: Final = web.AppKey("flows", FlowLog)  # absent when the API was built without a flow log


TUNNELS_KEY: Final = web.AppKey("tunnels", TunnelStore)  # absent when the API was built without the tunnel service
DNS_KEY: Final = web.AppKey("dns", QueryLog)  # absent when the API was built without the data plane
#: The data plane's status (steering, unattached-source drops) for /v1/status; absent without the data plane.
DATA_PLANE_STATUS_KEY: Final[web.AppKey[Callable[[], dict[str, Any]]]] = web.AppKey("data_plane_status")
#: What, besides the store, does not serve yet (the data plane's parts); readiness waits for an empty list.
READINESS_KEY: Final[web.AppKey[Callable[[], list[str]]]] = web.AppKey("readiness")
DRAINING_KEY: Final[web.AppKey[Callable[[], bool]]] = web.AppKey("draining")
#: Hosts the operator keeps opaque although an inspect entry marks them ([inspection] exclude_hosts).
INSPECTION_EXCLUDED_KEY: Final[web.AppKey[Callable[[str], bool]]] = web.AppKey("inspection_excluded")
#: Why the data plane would refuse to dial an address a sandbox's verdict allows (None: it would dial it).
DialRefusal = Callable[[CompiledPolicy, str, int], Refusal | None]
DIAL_REFUSAL_KEY: Final[web.AppKey[DialRefusal]] = web.AppKey("dial_refusal")
DOCUMENT_KEY: Final = web.AppKey("openapi_document", bytes)
#: The Prometheus exposition of the gateway's counters, rendered per scrape, and its media type.
METRICS_KEY: Final[web.AppKey[Callable[[], bytes]]] = web.AppKey("metrics")  # /openapi.json, rendered
MAX_DNS_LOG: Final = 1000
#: Seconds between the empty lines a quiet flow stream sends: how a subscriber that went away is noticed.
STREAM_HEARTBEAT: Final = 10.0
VERDICTS: Final = typing.get_args(FlowVerdict)


@dataclass(slots=True)
class _Exchange:
    """Per-request facts the middleware and the handler share: who called, which record a write named."""

    caller: Caller | None = None
    target: str | None = None
    query: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the route's query parameters, checked


# A context variable rather than request storage: each request runs in its own task, and
# typed request keys (web.RequestKey) only exist in recent aiohttp releases.
_EXCHANGE: ContextVar[_Exchange] = ContextVar("gateway_api_exchange")


# --------------------------------------------------------------------------- exposure / auth


def is_loopback_host(host: str) -> bool:
    """Whether a listen address (or Host header name) can only be reached from this machine."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_exposure(host: str, tokens: Sequence[ApiToken]) -> None:
    """Refuse an API without tokens unless it listens on loopback only. Raises CONFIG_INVALID."""
    if not tokens and not is_loopback_host(host):
        raise GatewayError(
            "CONFIG_INVALID",
            f"the API would listen on {host} with no tokens, so anyone who can reach it could change "
            "every policy; add [[api.tokens]] or listen on 127.0.0.1 / ::1",
            "api.tokens",
        )


def _authenticate(tokens: Iterable[ApiToken], header: str | None) -> Caller:
    if not header:
        raise _unauthenticated("missing Authorization: Bearer <token> header")
    scheme, _, presented = header.partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise _unauthenticated("the Authorization header must be 'Bearer <token>'")
    found: ApiToken | None = None
    for token in tokens:  # no early exit: the time taken does not say which token matched
        if token.matches(presented) and found is None:
            found = token
    if found is None:
        raise _unauthenticated("unknown token", invalid=True)
    return Caller(found.name, found.scopes, found.scope)


class _Unauthenticated(GatewayError):
    status = 401

    def __init__(self, message: str, challenge: str) -> None:
        super().__init__("UNAUTHENTICATED", message, "Authorization")
        self.challenge = challenge


def _unauthenticated(message: str, *, invalid: bool = False) -> _Unauthenticated:
    challenge = 'Bearer realm="gateway"' + (', error="invalid_token"' if invalid else "")
    return _Unauthenticated(message, challenge)


def _require(caller: Caller, scope: str) -> None:
    if not caller.has(scope):
        raise Forbidden("INSUFFICIENT_SCOPE", f"token {caller.name!r} lacks scope {scope}")


def _require_in_scope(caller: Caller, raw: object, *, create: bool) -> None:
    """A record a scoped caller sends names only sandboxes it may act on: the id it creates (a record without a
    string id is out of scope too) and the sources of its private links (a link from another tenant's sandbox
    would open a path out of it). Read before validation, like the profile, so that nothing else is said first."""
    if caller.sandboxes is None:
        return
    record = raw if isinstance(raw, dict) else {}
    if create:
        sandbox_id = record.get("id")
        if not isinstance(sandbox_id, str) or not caller.may_see(sandbox_id):
            shown = _shown(sandbox_id) if isinstance(sandbox_id, str) else "no id"
            raise Forbidden(
                "SANDBOX_OUT_OF_SCOPE",
                f"token {caller.name!r} may only create sandboxes matching {', '.join(caller.sandboxes.patterns)}; "
                f"the record has {shown}",
                "id",
            )
    links = record.get("private_links")
    for index, link in enumerate(links if isinstance(links, list) else []):
        source = link.get("source") if isinstance(link, dict) else link
        if isinstance(source, str) and not caller.may_see(source):
            raise Forbidden(
                "SANDBOX_OUT_OF_SCOPE",
                f"token {caller.name!r} may not link sandbox {_shown(source)} (outside its sandboxes) into this one",
                f"private_links[{index}]",
            )


def _require_network(caller: Caller, profile: str) -> None:
    """Each profile beyond isolated is gated by its own permission."""
    if profile != DEFAULT_PROFILE and not caller.has(f"network:{profile}"):
        raise Forbidden(
            "NETWORK_PROFILE_DENIED",
            f"token {caller.name!r} may not create, change or delete a sandbox with the {profile} profile "
            f"(needs scope network:{profile})",
            "profile",
        )


# --------------------------------------------------------------------------- responses and bodies


def _error(status: int, code: str, message: str, field: str | None = None, **headers: str) -> web.Response:
    return web.json_response({"code": code, "message": message, "field": field}, status=status, headers=headers)


async def _read_json(request: web.Request) -> Any:
    media = request.content_type
    if media not in JSON_TYPES:
        raise GatewayError(
            "UNSUPPORTED_MEDIA_TYPE",
            f"the body must be JSON (Content-Type: application/json), got {media or 'none'}",
            "Content-Type",
            status=415,
        )
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _too_large()
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large() from None
    if not raw.strip():
        raise GatewayError("INVALID_JSON", "the request body is empty; expected a JSON object")
    try:
        return parse_json(raw)
    except InvalidJson as exc:
        raise InvalidJson(f"the request body: {exc.message}") from None


def _too_large() -> GatewayError:
    return GatewayError("BODY_TOO_LARGE", f"the request body is larger than {MAX_BODY_BYTES} bytes", status=413)


def _query(request: web.Request, allowed: Iterable[str]) -> dict[str, str]:
    """The query parameters, refusing unknown or repeated ones (a typo should not be silently ignored)."""
    allowed = tuple(allowed)
    out: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in allowed:
            expected = ", ".join(allowed) if allowed else "none"
            raise GatewayError("UNKNOWN_PARAMETER", f"unknown query parameter {_shown(key)}; expected: {expected}", key)
        if key in out:
            raise GatewayError("INVALID_PARAMETER", f"query parameter {key!r} is given more than once", key)
        out[key] = value
    return out


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def _caller() -> Caller:
    caller = _EXCHANGE.get().caller
    if caller is None:  # only authenticated routes ask, and the middleware admitted someone
        raise RuntimeError("no authenticated caller for this request")
    return caller


def _params() -> Mapping[str, str]:
    """This request's query parameters, checked against the route's declared ones by the middleware."""
    return _EXCHANGE.get().query


def _set_target(target: str) -> None:
    _EXCHANGE.get().target = target


# --------------------------------------------------------------------------- middleware


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, scope checks, query parameter names, JSON errors and the write log, in one place for
    every route."""
    exchange = _Exchange()
    reset = _EXCHANGE.set(exchange)
    try:
        return await _handle(request, handler, exchange)
    finally:
        _EXCHANGE.reset(reset)


async def _handle(request: web.Request, handler: Handler, exchange: _Exchange) -> web.StreamResponse:
    spec: RouteSpec | None = None
    try:
        match = request.match_info
        resource = match.route.resource
        if match.http_exception is None and resource is not None:
            spec = request.app[ROUTES_KEY].get((request.method, resource.canonical))
        if spec is not None and not spec.public:
            exchange.caller = _admit(request)
            if spec.scope != AUTHENTICATED:
                _require(exchange.caller, spec.scope)
        if spec is not None:
            exchange.query = _query(request, (parameter.name for parameter in spec.query))
        response = await handler(request)
    except _Unauthenticated as exc:
        log.warning(
            "api.unauthenticated", method=request.method, path=request.path, remote=request.remote, reason=exc.message
        )
        return _error(exc.status, exc.code, exc.message, exc.field, **{"WWW-Authenticate": exc.challenge})
    except GatewayError as exc:
        if isinstance(exc, AddressInUse) and exchange.caller is not None and not exchange.caller.may_see(exc.owner):
            exc = exc.hidden()  # the address is taken, but by a sandbox this caller may not know of
        response = _error(exc.status, exc.code, exc.message, exc.field)
        _log_write(request, spec, exchange, response.status, exc.code)
        return response
    except web.HTTPException as exc:
        return _http_error(exc)
    except Exception:
        # Logged with the traceback for the operator; the client gets no internals.
        log.exception("api.internal_error", method=request.method, path=request.path)
        response = _error(500, "INTERNAL", "internal error; the gateway logged the details")
        _log_write(request, spec, exchange, 500, "INTERNAL")
        return response
    _log_write(request, spec, exchange, response.status, "ok")
    return response


def _admit(request: web.Request) -> Caller:
    tokens = request.app[TOKENS_KEY]
    if tokens.open:
        host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        if not is_loopback_host(host):
            raise Forbidden(
                "HOST_NOT_ALLOWED",
                "this API has no tokens and answers only requests addressed to a loopback name "
                "(127.0.0.1, [::1], localhost)",
                "Host",
            )
        return Caller("anonymous", frozenset({"admin"}))
    return _authenticate(tokens.current, request.headers.get("Authorization"))


def _http_error(exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        return _error(404, "NOT_FOUND", "no such route; see /openapi.json")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return _error(405, "METHOD_NOT_ALLOWED", f"{exc.method} is not allowed here; use {allowed}", Allow=allowed)
    if exc.status == 413:
        return _error(413, "BODY_TOO_LARGE", f"the request body is larger than {MAX_BODY_BYTES} bytes")
    return _error(exc.status, f"HTTP_{exc.status}", exc.reason)


def _log_write(request: web.Request, spec: RouteSpec | None, exchange: _Exchange, status: int, result: str) -> None:
    if spec is None or request.method not in WRITE_METHODS:
        return
    target = exchange.target or request.match_info.get("id") or request.match_info.get("name")
    event = log.info if result == "ok" else log.warning
    event(
        "api.write",
        token=exchange.caller.name if exchange.caller else None,
        action=spec.action,
        target=target,
        status=status,
        result=result,
    )


# --------------------------------------------------------------------------- handlers: service


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAINING_KEY]():  # first: a load balancer must stop sending at once
        return _error(503, "DRAINING", "the gateway is shutting down: new egress connections are refused")
    store = request.app[STORE_KEY]
    if not store.ready.is_set():
        return _error(503, "STORE_NOT_READY", f"the {store.backend} policy store has not loaded yet")
    lagging = store.out_of_sync()
    if lagging is not None:
        return _error(503, "STORE_NOT_SYNCED", lagging)
    waiting = request.app[READINESS_KEY]()
    if waiting:
        return _error(503, "DATA_PLANE_NOT_READY", "; ".join(waiting))
    return web.json_response({"ready": True, "backend": store.backend})


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCUMENT_KEY], content_type=JSON, charset="utf-8")


async def status(request: web.Request) -> web.Response:
    caller = _caller()
    if caller.sandboxes is not None:
        # Refused rather than cut down: the status describes the whole gateway (every sandbox's rejected records,
        # the data plane's drops by source), and a field added to it later must not leak by default.
        raise Forbidden(
            "GATEWAY_WIDE_ROUTE",
            f"token {caller.name!r} is limited to some sandboxes and the status describes the whole gateway; list "
            "your sandboxes with GET /v1/sandboxes",
        )
    body = request.app[STORE_KEY].status()
    body["auth"] = "open-loopback" if request.app[TOKENS_KEY].open else "tokens"
    if DATA_PLANE_STATUS_KEY in request.app:
        body["data_plane"] = request.app[DATA_PLANE_STATUS_KEY]()
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY]() if METRICS_KEY in request.app else b""
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def list_presets(request: web.Request) -> web.Response:
    presets = request.app[STORE_KEY].state.context.presets  # the configuration's, as the last reload left them
    return web.json_response({"presets": [presets[name].to_dict() for name in sorted(presets)]})


# --------------------------------------------------------------------------- handlers: sandboxes


def _sandbox_url(sandbox_id: str) -> str:
    return f"/v1/sandboxes/{sandbox_id}"


async def list_sandboxes(request: web.Request) -> web.Response:
    query = _params()
    profile = query.get("profile")
    if profile is not None and profile not in PROFILES:
        raise GatewayError(
            "INVALID_PROFILE", f"{_shown(profile)} is not a profile; use one of {', '.join(PROFILES)}", "profile"
        )
    template = query.get("template")
    state = request.app[STORE_KEY].state
    sandboxes = state.sandboxes
    caller = _caller()
    records = [
        _sandbox_answer(state, sandboxes[sid])
        for sid in sorted(sandboxes)
        if caller.may_see(sid)
        and (profile is None or sandboxes[sid].profile == profile)
        and (template is None or sandboxes[sid].template == template)
    ]
    return web.json_response({"sandboxes": records})


def _claimed_profile(raw: object) -> str:
    """The profile a record asks for, read before validation so that the scope check comes first. Anything
    that is not a known profile needs no scope: validation refuses it next."""
    profile = raw.get("profile", DEFAULT_PROFILE) if isinstance(raw, dict) else DEFAULT_PROFILE
    return profile if isinstance(profile, str) and profile in PROFILES else DEFAULT_PROFILE


def _sandbox_answer(state: PolicyState, sandbox: Sandbox) -> dict[str, Any]:
    """The record as the API shows it: with the revision in force (read-only, never stored)."""
    return {**sandbox.to_dict(), "revision": state.compiled[sandbox.id].revision}


def _split_revision(raw: object) -> tuple[object, str | None]:
    """A record sent back as the API showed it carries the `revision` it was read at: taken out of the record
    (it is not a field of it) and returned, for the write to check it is still the one in force."""
    if not isinstance(raw, dict) or "revision" not in raw:
        return raw, None
    record = dict(raw)
    return record, check_revision(record.pop("revision"))


def _written(store: PolicyStore, sandbox: Sandbox) -> web.Response:
    """A sandbox change's answer: the record with its revision, which the header repeats, and the live cut."""
    answer = _sandbox_answer(store.state, sandbox)
    return web.json_response(answer, headers={REVISION_HEADER: answer["revision"], **_cut(store)})


def _sandbox(request: web.Request, sandbox_id: str) -> Sandbox:
    """The sandbox's record; 404 SANDBOX_NOT_FOUND when there is none or the caller may not see it (the same
    answer, so that a scoped token cannot probe for other sandboxes' ids)."""
    return request.app[STORE_KEY].state.get_sandbox(sandbox_id, _caller().may_see)


def _require_sandbox_scope(request: web.Request, sandbox_id: str) -> Sandbox:
    """The current record (404 when none or out of the caller's sandboxes), once the caller holds its profile's
    scope: changing or deleting a sandbox is acting on that profile's network as much as creating one."""
    current = _sandbox(request, sandbox_id)
    _require_network(_caller(), current.profile)
    return current


async def create_sandbox(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    raw = await _read_json(request)
    if isinstance(raw, dict) and isinstance(raw.get("id"), str):
        _set_target(raw["id"][:64])  # the write log names the record even when the write is refused
    _require_in_scope(_caller(), raw, create=True)
    _require_network(_caller(), _claimed_profile(raw))
    raw, _ = _split_revision(raw)  # a record copied from a GET: no revision of a new sandbox to compare it with
    async with _write_lock(request):
        sandbox = await store.create_sandbox(raw)
        answer = _sandbox_answer(store.state, sandbox)  # under the lock: the revision this write put in force
    headers = {"Location": _sandbox_url(sandbox.id), REVISION_HEADER: answer["revision"]}
    return web.json_response(answer, status=201, headers=headers)


async def get_sandbox(request: web.Request) -> web.Response:
    state = request.app[STORE_KEY].state
    return web.json_response(_sandbox_answer(state, _sandbox(request, request.match_info["id"])))


async def replace_sandbox(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    sandbox_id = request.match_info["id"]
    _require_sandbox_scope(request, sandbox_id)  # before the body is read: no work for a caller who may not act
    raw = await _read_json(request)
    _require_in_scope(_caller(), raw, create=False)
    _require_network(_caller(), _claimed_profile(raw))
    raw, revision = _split_revision(raw)
    async with _write_lock(request):
        _require_sandbox_scope(request, sandbox_id)  # again under the lock: the record may have been replaced
        sandbox = await store.replace_sandbox(sandbox_id, raw, revision=revision)
        return _written(store, sandbox)


async def patch_sandbox(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    sandbox_id = request.match_info["id"]
    _require_sandbox_scope(request, sandbox_id)
    patch = await _read_json(request)
    if not isinstance(patch, dict):
        raise GatewayError("INVALID_TYPE", "a merge patch is a JSON object (RFC 7396)")
    _require_in_scope(_caller(), patch, create=False)
    _require_network(_caller(), _claimed_profile(patch))
    patch, revision = _split_revision(patch)
    # Read, merge and write under one lock so a concurrent API write is never lost.
    async with _write_lock(request):
        current = _require_sandbox_scope(request, sandbox_id)
        merged = apply_merge_patch(current.to_dict(), patch)
        sandbox = await store.replace_sandbox(sandbox_id, merged, revision=revision)
        return _written(store, sandbox)


async def delete_sandbox(request: web.Request) -> web.Response:
    sandbox_id = request.match_info["id"]
    store = request.app[STORE_KEY]
    async with _write_lock(request):
        _require_sandbox_scope(request, sandbox_id)
        await store.delete_sandbox(sandbox_id)
        cut = _cut(store)
    tunnels = request.app.get(TUNNELS_KEY)
    if tunnels is not None:
        # Exposure lasts until the sandbox does. The tunnel store's maintenance would find these
        # too (and does, for deletions by other writers); here it happens before the answer.
        await tunnels.revoke_sandbox(sandbox_id)
    return web.Response(status=204, headers=cut)


async def sandbox_revisions(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    sandbox_id = request.match_info["id"]
    _sandbox(request, sandbox_id)
    revision = store.state.compiled[sandbox_id].revision  # read before the await: the answer is of one moment
    entries = [entry.to_dict() for entry in await store.revisions(sandbox_id)]
    return web.json_response({"sandbox": sandbox_id, "revision": revision, "revisions": entries})


async def restore_sandbox(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    sandbox_id = request.match_info["id"]
    _require_sandbox_scope(request, sandbox_id)
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise GatewayError("INVALID_TYPE", 'the body is a JSON object: {"revision": "r..."}, or {} for the previous')
    unknown = sorted(set(body) - {"revision"})
    if unknown:
        raise GatewayError(
            "UNKNOWN_FIELD", f"unknown field {unknown[0][:40]!r}; the body has only revision", unknown[0]
        )
    revision = None if body.get("revision") is None else check_revision(body["revision"])
    async with _write_lock(request):
        _require_sandbox_scope(request, sandbox_id)  # a restore keeps the profile (or is PROFILE_IMMUTABLE)
        if _caller().sandboxes is not None:  # the record restored is written as this caller's: its links too
            entry = find_revision(await store.revisions(sandbox_id), sandbox_id, revision)
            _require_in_scope(_caller(), entry.record, create=False)
        restored = await store.restore_sandbox(sandbox_id, revision)
        response = _written(store, store.state.get_sandbox(sandbox_id))
    response.headers[RESTORED_HEADER] = restored.revision
    return response


async def sandbox_policy(request: web.Request) -> web.Response:
    state = request.app[STORE_KEY].state
    sandbox_id = request.match_info["id"]
    _sandbox(request, sandbox_id)  # 404 with the usual code when unknown
    return web.json_response(state.compiled[sandbox_id].describe())


def _parse_port(text: str, field: str) -> int:
    port = parse_decimal(text, 1, 65535)
    if port is None:
        raise GatewayError("INVALID_PORT", f"{_shown(text)} is not a port in 1-65535", field)
    return port


def _shown(text: str) -> str:
    """`text` quoted for an error message, cut short: a hostile parameter may be 100 KiB long."""
    return repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"


def _parse_address(text: str, field: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise GatewayError("INVALID_ADDRESS", f"{_shown(text)} is not an IPv4 or IPv6 address", field) from None


def _split_host_port(text: str) -> tuple[str, str | None]:
    """`name`, `name:port`, `[v6]`, `[v6]:port`, or a bare IPv6 address (no port)."""
    if "://" in text:
        return text, None  # a URL: let the hostname check say so, rather than read "//x" as a port
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise GatewayError("INVALID_HOSTNAME", f"{_shown(text)} is not host, host:port or [v6]:port", "host")
        return inner, rest[1:] if rest else None
    if text.count(":") == 1:
        name, _, port = text.partition(":")
        return name, port
    return text, None


def _parse_http_request(query: Mapping[str, str], protocol: str) -> tuple[str | None, str | None]:
    """Explain's `method` and `path` (either implies the other's default: GET, /); the path loses its query,
    as the tier decides without it."""
    asked_method, asked_path = query.get("method"), query.get("path")
    if not asked_method and not asked_path:
        return None, None
    if protocol not in ("tls", "http"):
        raise GatewayError(
            "INVALID_PARAMETER",
            f"method and path describe an HTTP request, which a {protocol} question has none of; "
            "ask with protocol tls or http",
            "method" if asked_method else "path",
        )
    method, path = asked_method or "GET", asked_path or "/"
    if len(method) > MAX_EXPLAIN_METHOD or not HTTP_TOKEN_PATTERN.fullmatch(method):
        raise GatewayError(
            "INVALID_METHOD", f"{_shown(method)} is not an HTTP method (case-sensitive, such as GET)", "method"
        )
    if len(path) > MAX_EXPLAIN_PATH or not path.startswith("/") or not (path.isascii() and path.isprintable()):
        raise GatewayError(
            "INVALID_PATH",
            f"{_shown(path)} is not a request path: it starts with / and is visible ASCII (percent-encoded), "
            f"at most {MAX_EXPLAIN_PATH} characters",
            "path",
        )
    if " " in path:
        raise GatewayError("INVALID_PATH", "a request path has no spaces (percent-encode them: %20)", "path")
    return method, path.partition("?")[0].partition("#")[0]


def parse_explain_query(query: Mapping[str, str]) -> ExplainRequest:
    """Validate explain's inputs; `host` may carry the port (`example.com:8443`, `[2001:db8::1]:443`)."""
    protocol = query.get("protocol", "tls").lower()
    if protocol not in PROTOCOLS:
        raise GatewayError(
            "INVALID_PROTOCOL", f"{_shown(protocol)} is not a protocol; use one of {', '.join(PROTOCOLS)}", "protocol"
        )
    method, path = _parse_http_request(query, protocol)
    hostname: str | None = None
    address = _parse_address(query["address"], "address") if query.get("address") else None
    port = _parse_port(query["port"], "port") if query.get("port") else None
    if query.get("host"):
        name, host_port = _split_host_port(query["host"])
        if host_port is not None:
            in_host = _parse_port(host_port, "host")
            if port is not None and port != in_host:
                raise GatewayError("INVALID_PORT", f"host says port {in_host} but port says {port}", "port")
            port = in_host
        try:
            literal = str(ipaddress.ip_address(name))
        except ValueError:
            literal = None
        if literal is not None:
            # A connection to a bare address carries no name (no SNI / Host); explain it as that.
            if address is not None and address != literal:
                raise GatewayError(
                    "INVALID_ADDRESS", f"host is the address {literal} but address says {address}", "address"
                )
            address = literal
        else:
            try:
                hostname = normalize_pattern(name)
            except GatewayError as exc:
                raise GatewayError(exc.code, exc.message, "host") from None
            if hostname.startswith("*."):
                raise GatewayError("INVALID_HOSTNAME", "explain takes one concrete hostname, not a wildcard", "host")
    if hostname is None and address is None:
        raise GatewayError("MISSING_FIELD", "give host (a name, name:port or an address) and/or address", "host")
    if protocol == "dns":
        if hostname is None:
            raise GatewayError("MISSING_FIELD", "a DNS question needs a host name", "host")
        return ExplainRequest(hostname, None, None, protocol)  # decided on the name alone, like the resolver
    if port is None:
        port = DEFAULT_PORTS.get(protocol)
        if port is None:
            raise GatewayError("MISSING_FIELD", f"protocol {protocol} has no default port; give port", "port")
    return ExplainRequest(hostname, address, port, protocol, method, path)


def _say_when_the_address_decides(verdict: Verdict, policy: CompiledPolicy, asked: ExplainRequest) -> Verdict:
    """A connection always has a destination address, so the engine decides allow_cidrs by it; explain asked
    about a name alone cannot. "host not in allowlist" would then read as a final answer where the address
    was the missing half: say so (explain does not resolve the name: which address the sandbox dials is the
    sandbox's choice)."""
    if verdict.rule is not Rule.DEFAULT_DENY or asked.address is not None or asked.protocol == "dns":
        return verdict  # a default:deny verdict is a deny, or a would-deny in report mode
    if not asked.host or not policy.effective_egress.allow_cidrs:
        return verdict
    return dataclasses.replace(
        verdict,
        reason=f"{verdict.reason}; allow_cidrs decide by the destination address, which was not given: "
        "ask again with the address the sandbox would connect to",
    )


def _inspected(verdict: Verdict) -> bool:
    """Whether the connection goes to the inspection tier: an inspect entry allows it (a would-deny verdict of
    that rule is a port the entry does not mark, relayed as it is in report mode)."""
    return verdict.allowed and verdict.rule is Rule.INSPECT and not verdict.would_deny


def _explain_http(verdict: Verdict, policy: CompiledPolicy, method: str, path: str) -> dict[str, Any] | None:
    """The inspection tier's answer to the request, on a connection an inspect entry marks; None when no entry
    marks it (then the connection's verdict decides every request on it). Explain takes no headers, so the
    entry's header conditions are listed for the caller to check, not decided."""
    rule = policy.inspect_rule(verdict.detail) if _inspected(verdict) else None
    if rule is None:
        return None
    decided = decide_request(dataclasses.replace(rule, headers=()), method, path, [])
    return {
        "allowed": decided.allowed,
        "reason": decided.reason,
        "failed": decided.failed,
        "header_conditions": [match.to_dict() for match in rule.headers],
    }


async def explain(request: web.Request) -> web.Response:
    query = _params()
    sandbox_id = request.match_info["id"]
    state = request.app[STORE_KEY].state
    _sandbox(request, sandbox_id)  # unknown sandbox: 404 before input errors would mislead
    asked = parse_explain_query(query)
    chain: list[ChainStep] = []
    verdict, policy = state.explain(
        sandbox_id,
        asked.host,
        asked.address,
        asked.port,
        asked.protocol,
        lambda rule, result: chain.append(ChainStep(rule.label(), result)),
    )
    verdict = _say_when_the_address_decides(verdict, policy, asked)
    if verdict.allowed and asked.address is not None and asked.port is not None:
        # The engine refuses these addresses whatever the verdict (report mode included): so does explain.
        refusal = request.app[DIAL_REFUSAL_KEY](policy, asked.address, asked.port)
        if refusal is not None:
            verdict = Verdict(False, refusal.reason, refusal.rule)
    excluded = _inspected(verdict) and request.app[INSPECTION_EXCLUDED_KEY](asked.host or "")
    if excluded:
        verdict = dataclasses.replace(
            verdict,
            reason=f"{verdict.reason}; excluded from inspection ([inspection] exclude_hosts): relayed opaque, the "
            "entry's HTTP rules and credentials do not apply",
        )
    chain.append(ChainStep(verdict.label, verdict.reason, decided=True))
    answer = {
        **verdict.to_dict(),
        "sandbox": sandbox_id,
        "request": asked.to_dict(),
        "chain": [step.to_dict() for step in chain],
        "policy": policy.describe(),
    }
    if asked.method is not None and asked.path is not None:
        http = answer["http"] = None if excluded else _explain_http(verdict, policy, asked.method, asked.path)
        if http is not None and not http["allowed"]:
            answer |= {"allowed": False, "reason": http["reason"]}  # the connection opens, the request is refused
    return web.json_response(answer)


async def policy_diff(request: web.Request) -> web.Response:
    query = _params()
    flows, sandbox_id = _audit_sandbox(request)
    state = request.app[STORE_KEY].state
    _sandbox(request, sandbox_id)  # a candidate is for a sandbox that exists, as a PUT's record is
    seconds = parse_since(query.get("since", DEFAULT_SINCE))
    candidate = state.candidate(sandbox_id, await _read_json(request))
    async with _replaying(request):
        since_us = now_us() - seconds * 1_000_000
        # Reading the batches and deciding every distinct flow: off the event loop, which runs the data plane.
        diff = await asyncio.to_thread(
            lambda: replay(sandbox_id, flows.batches_since(sandbox_id, since_us), candidate, since_us)
        )
    return web.json_response(diff.to_dict())


async def policy_suggest(request: web.Request) -> web.Response:
    query = _params()
    flows, sandbox_id = _audit_sandbox(request)
    state = request.app[STORE_KEY].state
    sandbox = _sandbox(request, sandbox_id)  # batches outlive a record, but a suggestion replaces one
    seconds = parse_since(query.get("since", DEFAULT_SINCE))
    kept = state.candidate(sandbox_id, kept_record(sandbox))
    check_applicable(sandbox, kept)
    async with _replaying(request):
        since_us = now_us() - seconds * 1_000_000
        suggestion = await asyncio.to_thread(
            lambda: suggest(sandbox, flows.batches_since(sandbox_id, since_us), kept, since_us)
        )
    # Checked on the event loop, which owns the policy state: the record is one a PUT would take.
    state.candidate(sandbox_id, suggestion.record)
    return web.json_response(suggestion.to_dict())


@contextlib.asynccontextmanager
async def _replaying(request: web.Request) -> AsyncIterator[None]:
    """The gateway's one flow-log reading slot (policy diff, policy suggest), or REPLAY_BUSY (503): refused
    rather than queued, since waiting callers would hold the CPU one after another."""
    lock = request.app[REPLAY_LOCK_KEY]
    if lock.locked():
        raise GatewayError("REPLAY_BUSY", "another policy diff or suggestion is reading the flow log on this "
                           "gateway; try again when it ends", status=503)  # fmt: skip
    async with lock:
        yield


# --------------------------------------------------------------------------- handlers: audit batches


def _flow_log(request: web.Request, what: str = "records") -> FlowLog:
    """The gateway's flow log; 503 AUDIT_DISABLED when it runs without one (so there are no `what`)."""
    flows = request.app.get(FLOWS_KEY)
    if flows is None:
        raise GatewayError("AUDIT_DISABLED", f"this gateway was started without a flow log, so there are no {what}",
                           status=503)  # fmt: skip
    return flows


def _audit_sandbox(request: web.Request) -> tuple[FlowLog, str]:
    """The flow log and a sandbox id that has a record or batches. Batches outlive the sandbox's record, so a
    deleted sandbox's audit trail stays readable; an id with neither is 404."""
    flows = _flow_log(request, "audit batches")
    sandbox_id = request.match_info["id"]
    known = sandbox_id in request.app[STORE_KEY].state.sandboxes or flows.has_sandbox(sandbox_id)
    if not known or not _caller().may_see(sandbox_id):
        raise NotFound("SANDBOX_NOT_FOUND", f"no sandbox {sandbox_id!r} and no audit batches for it", "id")
    return flows, sandbox_id


def _int_parameter(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    value = parse_decimal(text, low, high)
    if value is None:
        raise GatewayError("INVALID_PARAMETER", f"{name} must be an integer in {low}-{high}, got {_shown(text)}", name)
    return value


async def list_audit_batches(request: web.Request) -> web.Response:
    query = _params()
    flows, sandbox_id = _audit_sandbox(request)
    since_us = _int_parameter(query, "since_us", 0, 0, 2**63 - 1)
    limit = _int_parameter(query, "limit", 100, 1, MAX_LIST_LIMIT)
    token = query.get("continuation_token") or None
    # The directory listing touches the disk: off the event loop, which also runs the data plane.
    batches, next_token = await asyncio.to_thread(flows.list_batches, sandbox_id, since_us, token, limit)
    return web.json_response({"batches": batches, "next_continuation_token": next_token})


async def get_audit_batch(request: web.Request) -> web.Response:
    flows, sandbox_id = _audit_sandbox(request)
    name = check_batch_name(request.match_info["name"])
    body = await asyncio.to_thread(flows.read_batch, sandbox_id, name)
    return web.Response(body=body, content_type=NDJSON)


async def get_denial(request: web.Request) -> web.Response:
    flows = _flow_log(request)
    # A lookup past the recent ones reads batches: off the event loop, which also runs the data plane.
    record = await asyncio.to_thread(flows.denial, request.match_info["id"], _caller().may_see)
    return web.json_response(record.to_dict())


async def stream_flows(request: web.Request) -> web.StreamResponse:
    query = _params()
    flows = _flow_log(request)
    sandbox = query.get("sandbox")
    if sandbox is not None:
        check_sandbox_id(sandbox)
    verdict = query.get("verdict")
    if verdict is not None and verdict not in VERDICTS:
        raise GatewayError(
            "INVALID_PARAMETER", f"verdict must be one of {', '.join(VERDICTS)}, got {_shown(verdict)}", "verdict"
        )
    # A scoped caller's view holds only its sandboxes' records: one out of its scope shows nothing, as an
    # unknown sandbox does.
    subscription = flows.subscribe(sandbox, verdict, _caller().may_see)
    try:
        response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
        await response.prepare(request)
        lagged = 0
        while True:
            lines = await subscription.next(STREAM_HEARTBEAT)
            body = "".join(line + "\n" for line in lines)
            if subscription.lagged != lagged:  # said where it happened, so the reader knows the view has a gap
                body += json.dumps({"note": "lagged", "dropped": subscription.lagged - lagged}) + "\n"
                lagged = subscription.lagged
            await response.write(body.encode() or b"\n")  # raises once the subscriber has gone
    except (ConnectionError, asyncio.CancelledError):
        return response
    finally:
        flows.unsubscribe(subscription)


async def dns_log(request: web.Request) -> web.Response:
    query = _params()
    dns = request.app.get(DNS_KEY)
    if dns is None:
        raise GatewayError(
            "DNS_DISABLED", "this gateway runs without the data plane, so there is no DNS query log", status=503
        )
    sandbox_id = request.match_info["id"]
    _sandbox(request, sandbox_id)
    limit = _int_parameter(query, "limit", 100, 1, MAX_DNS_LOG)
    return web.json_response({"queries": dns.query_log(sandbox_id, limit)})


# --------------------------------------------------------------------------- handlers: tunnels


def _tunnels(request: web.Request) -> TunnelStore:
    tunnels = request.app.get(TUNNELS_KEY)
    if tunnels is None:
        raise GatewayError(
            "TUNNELS_DISABLED",
            "this gateway was started without the tunnel service, so there are no tunnels",
            status=503,
        )
    return tunnels


async def list_tunnels(request: web.Request) -> web.Response:
    tunnels = _tunnels(request)
    sandbox_id = request.match_info["id"]
    _sandbox(request, sandbox_id)
    return web.json_response({"tunnels": [tunnels.public(t) for t in tunnels.for_sandbox(sandbox_id)]})


async def create_tunnel(request: web.Request) -> web.Response:
    tunnels = _tunnels(request)
    sandbox_id = request.match_info["id"]
    _sandbox(request, sandbox_id)  # 404 before body errors would mislead
    raw = await _read_json(request)
    tunnel = await tunnels.create(sandbox_id, raw)
    _set_target(f"{sandbox_id}/tunnel:{tunnel.id[:4]}")  # the id is the URL: log only a prefix
    return web.json_response(tunnels.public(tunnel), status=201, headers={"Location": f"/v1/tunnels/{tunnel.id}"})


async def get_tunnel(request: web.Request) -> web.Response:
    tunnels = _tunnels(request)
    return web.json_response(tunnels.public(tunnels.get(request.match_info["id"], _caller().may_see)))


async def revoke_tunnel(request: web.Request) -> web.Response:
    tunnels = _tunnels(request)
    tunnel_id = request.match_info["id"]
    _set_target(f"tunnel:{tunnel_id[:4]}")
    return web.json_response(tunnels.public(await tunnels.revoke(tunnel_id, visible=_caller().may_see)))


# --------------------------------------------------------------------------- handlers: templates


async def list_templates(request: web.Request) -> web.Response:
    templates = request.app[STORE_KEY].state.templates
    return web.json_response({"templates": [templates[name].to_dict() for name in sorted(templates)]})


async def create_template(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    raw = await _read_json(request)
    async with _write_lock(request):
        name = store.state.parse_template(raw).name
        _set_target(name)
        template = await store.put_template(name, raw, create=True)
    return web.json_response(template.to_dict(), status=201, headers={"Location": f"/v1/templates/{name}"})


async def get_template(request: web.Request) -> web.Response:
    return web.json_response(request.app[STORE_KEY].state.get_template(request.match_info["name"]).to_dict())


async def replace_template(request: web.Request) -> web.Response:
    raw = await _read_json(request)
    store = request.app[STORE_KEY]
    async with _write_lock(request):
        template = await store.put_template(request.match_info["name"], raw, create=False)
        cut = _cut(store)
    return web.json_response(template.to_dict(), headers=cut)


async def delete_template(request: web.Request) -> web.Response:
    async with _write_lock(request):
        await request.app[STORE_KEY].delete_template(request.match_info["name"])
    return web.Response(status=204)


def _write_lock(request: web.Request) -> asyncio.Lock:
    return request.app[WRITE_LOCK_KEY]


CUT_ANSWER: Final = {
    CUT_HEADER: "How many established connections of the sandbox (or the template's sandboxes) this write ended "
    "because the policy in force no longer allows them (0 when it widened or kept them); counted by the process "
    "that answers."
}


REVISION_ANSWER: Final = {
    REVISION_HEADER: "The revision of the sandbox's policy now in force (as the body's `revision`): the content id "
    "of its record and its template's, the same on every node."
}


def _cut(store: PolicyStore) -> dict[str, str]:
    """Read right after the write returned (no await between): the state's last commit is this write's."""
    return {CUT_HEADER: str(store.state.last_cut)}


# --------------------------------------------------------------------------- malformed requests


class _MalformedRequestFilter(logging.Filter):
    """aiohttp answers a request it cannot parse (a bad request line, header or framing) with 400 itself and
    logs it through the stdlib logger `aiohttp.server` with a traceback. Bad input from a client is not a
    fault of the gateway: it becomes one warning line here; every other record (a real fault) passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        reason = " ".join(str(error.message).split())[:200]  # aiohttp's message spans lines and quotes the input
        log.warning("api.malformed_request", remote=remote, error=type(error).__name__, reason=reason)
        return False


_MALFORMED_REQUESTS: Final = _MalformedRequestFilter()


# --------------------------------------------------------------------------- the application


#: Example bodies, published in the OpenAPI document; the tests run each through the real parser.
SANDBOX_EXAMPLES: Final[Mapping[str, Any]] = {
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
    "unrestricted_minus_trackers": {
        "id": "browser-4",
        "addresses": ["10.75.0.14"],
        "profile": "unrestricted",
        "egress": {"deny_hosts": ["*.tracker.example", "ads.example.net", "telemetry.example.org:443"]},
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
    "inspected_read_only": {
        "id": "reviewer-3",
        "addresses": ["10.75.0.13"],
        "profile": "allowlisted",
        "egress": {
            "inspect": [
                {
                    "hosts": ["api.github.com"],
                    "methods": ["GET", "HEAD", "OPTIONS"],
                    "paths": ["/repos/*", "/user"],
                    "deny_reason": "read-only GitHub",
                }
            ]
        },
    },
}
SANDBOX_PATCH_EXAMPLES: Final[Mapping[str, Any]] = {
    "add_hosts": {"egress": {"allow_hosts": ["api.github.com", "pypi.org", "build.example.net:8443"]}},
    "deny_hosts": {"egress": {"deny_hosts": ["*.tracker.example"]}},
    "drop_own_limits": {"limits": None},
    "relabel": {"labels": {"team": "platform"}},
}
TEMPLATE_EXAMPLES: Final[Mapping[str, Any]] = {
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
TUNNEL_EXAMPLES: Final[Mapping[str, Any]] = {
    "public_preview": {"port": 3000, "label": "Web Server"},
    "password_protected": {"port": 8080, "label": "Admin UI", "password": "correct horse battery", "ttl": 3600},
    "vite_dev_server": {"port": 5173, "rewrite_host": True},
}

_PROFILE_SCOPE: Final = (
    "A sandbox whose profile (the stored one, and the one the body names) is not isolated also needs scope "
    "network:<profile>; without it the answer is 403 NETWORK_PROFILE_DENIED, before the body is validated, "
    "and nothing is written."
)
_SANDBOX_WRITE_403: Final = (
    ERROR_CODES[403] + " NETWORK_PROFILE_DENIED: the token lacks network:<profile>. SANDBOX_OUT_OF_SCOPE: the token "
    "is limited to some sandboxes and the record creates another, or links one of the others in (private_links)."
)
_AUDIT_DISABLED: Final = "AUDIT_DISABLED: the gateway runs without a flow log."
_TUNNELS_DISABLED: Final = (
    "TUNNELS_DISABLED: this API was started without the tunnel service. Also STORE_UNAVAILABLE / STORE_WRITE_FAILED."
)
_WRITE_ERRORS: Final = {413: None, 415: None, 503: None}  # every write reads a body and reaches the store
_STALE: Final = (
    "REVISION_CONFLICT: the record sent carries the revision it was read at, and another is in force by now."
)


def route_specs() -> tuple[RouteSpec, ...]:
    """Every route the API serves, and all the OpenAPI document says of it (the tests hold the two together)."""
    sandbox_id = "/v1/sandboxes/{id}"
    return (
        RouteSpec(
            "GET", "/healthz", healthz, PUBLIC, "healthz", "Liveness", "service", {200: Answer("Alive.", "Health")}
        ),
        RouteSpec(
            "GET",
            "/readyz",
            readyz,
            PUBLIC,
            "readyz",
            "Readiness: the policy store has loaded and, with the data plane, it all serves",
            "service",
            {200: Answer("The store is loaded; the engine, its workers and DNS listen; steered.", "Ready")},
            {
                503: "DRAINING: the gateway is shutting down (SIGTERM/SIGINT) and refuses new egress connections. "
                "STORE_NOT_READY: the policy store has not loaded yet. STORE_NOT_SYNCED: the Redis store lost "
                "its connection (or has had no answer for a few seconds). DATA_PLANE_NOT_READY: the message names "
                "each part that does not serve yet (the egress engine or a worker not listening, the DNS "
                "interceptor not listening, the steering table not applied)."
            },
        ),
        RouteSpec(
            "GET",
            "/openapi.json",
            openapi_json,
            PUBLIC,
            "openapi",
            "This document",
            "service",
            {200: Answer("The OpenAPI 3.1 document.", {"type": "object"})},
        ),
        RouteSpec(
            "GET",
            "/metrics",
            metrics,
            "metrics:read",
            "metrics",
            "Prometheus metrics: connections, bytes, DNS queries, flow records, store, inspection tier, workers",
            "service",
            {200: Answer("The Prometheus text exposition format.", {"type": "string"}, media="text/plain")},
            description="Needs a token with `metrics:read` (or `admin`), sent as `Authorization: Bearer <token>` "
            "(Prometheus: `authorization: {credentials: <token>}` in the scrape config). The README lists the names.",
        ),
        RouteSpec(
            "GET",
            "/v1/status",
            status,
            "sandboxes:read",
            "status",
            "Store backend, readiness, counts and rejected outside records",
            "service",
            {200: Answer("The store's status.", "Status")},
            {
                403: ERROR_CODES[403] + " GATEWAY_WIDE_ROUTE: the token is limited to some sandboxes, and the status "
                "describes the whole gateway."
            },
        ),
        RouteSpec(
            "GET",
            "/v1/presets",
            list_presets,
            AUTHENTICATED,
            "presets.list",
            "Built-in and configured presets",
            "presets",
            {200: Answer("Every preset, by name.", "PresetList")},
            description="Any valid token may read the presets.",
        ),
        RouteSpec(
            "GET",
            "/v1/sandboxes",
            list_sandboxes,
            "sandboxes:read",
            "sandboxes.list",
            "List sandboxes",
            "sandboxes",
            {200: Answer("Sandboxes sorted by id.", "SandboxList")},
            query=(Query("profile", {"type": "string", "enum": list(PROFILES)}), Query("template", {"type": "string"})),
        ),
        RouteSpec(
            "POST",
            "/v1/sandboxes",
            create_sandbox,
            "sandboxes:write",
            "sandboxes.create",
            "Create a sandbox",
            "sandboxes",
            {201: Answer("Created.", "Sandbox", headers={"Location": "/v1/sandboxes/{id}", **REVISION_ANSWER})},
            {
                **_WRITE_ERRORS,
                403: _SANDBOX_WRITE_403,
                409: "SANDBOX_EXISTS: the id is taken. ADDRESS_IN_USE: an address belongs to another sandbox.",
            },
            body=Body("SandboxCreate", SANDBOX_EXAMPLES),
            description=_PROFILE_SCOPE,
        ),
        RouteSpec(
            "GET",
            sandbox_id,
            get_sandbox,
            "sandboxes:read",
            "sandboxes.get",
            "Get a sandbox",
            "sandboxes",
            {200: Answer("The record.", "Sandbox")},
            {404: None},
        ),
        RouteSpec(
            "PUT",
            sandbox_id,
            replace_sandbox,
            "sandboxes:write",
            "sandboxes.replace",
            "Replace a sandbox (it must exist; create with POST)",
            "sandboxes",
            {200: Answer("Replaced.", "Sandbox", headers={**CUT_ANSWER, **REVISION_ANSWER})},
            {
                **_WRITE_ERRORS,
                403: _SANDBOX_WRITE_403,
                404: None,
                409: f"PROFILE_IMMUTABLE: the profile differs from the stored one. ADDRESS_IN_USE. {_STALE}",
            },
            body=Body(
                "SandboxReplace",
                {name: {k: v for k, v in record.items() if k != "id"} for name, record in SANDBOX_EXAMPLES.items()},
            ),
            description=_PROFILE_SCOPE,
        ),
        RouteSpec(
            "PATCH",
            sandbox_id,
            patch_sandbox,
            "sandboxes:write",
            "sandboxes.patch",
            "Change a sandbox with a JSON merge patch (RFC 7396)",
            "sandboxes",
            {200: Answer("The record after the patch.", "Sandbox", headers={**CUT_ANSWER, **REVISION_ANSWER})},
            {
                **_WRITE_ERRORS,
                403: _SANDBOX_WRITE_403,
                404: None,
                409: f"PROFILE_IMMUTABLE: the patch changes the profile. ADDRESS_IN_USE. {_STALE}",
            },
            body=Body("SandboxPatch", SANDBOX_PATCH_EXAMPLES, (MERGE_PATCH, JSON)),
            description="The patch is applied to the stored record and the result validated as a whole. Send it as "
            "application/merge-patch+json (application/json is accepted too). " + _PROFILE_SCOPE,
        ),
        RouteSpec(
            "DELETE",
            sandbox_id,
            delete_sandbox,
            "sandboxes:write",
            "sandboxes.delete",
            "Delete a sandbox",
            "sandboxes",
            {204: Answer("Deleted; its traffic is refused from now on, its connections ended.", headers=CUT_ANSWER)},
            {403: _SANDBOX_WRITE_403, 404: None, 503: None},
            description=_PROFILE_SCOPE + " Its revision history goes with it.",
        ),
        RouteSpec(
            "GET",
            f"{sandbox_id}/revisions",
            sandbox_revisions,
            "sandboxes:read",
            "sandboxes.revisions",
            f"The sandbox's last {HISTORY_SIZE} policy revisions",
            "sandboxes",
            {200: Answer("Newest (the one in force) first, each with its record, time and source.", "RevisionList")},
            {404: None},
            description="Every accepted change of the sandbox's record or of its template's is a revision, whoever "
            "wrote it (api, file: a hand edit of the policy file, redis: a record another service wrote).",
        ),
        RouteSpec(
            "POST",
            f"{sandbox_id}/restore",
            restore_sandbox,
            "sandboxes:write",
            "sandboxes.restore",
            "Re-apply the record of one of the sandbox's recent revisions (default: the previous one)",
            "sandboxes",
            {
                200: Answer(
                    "Restored: the record now in force. Its revision is the one restored unless the template "
                    "changed since (a restore re-applies the sandbox's record over the template in force).",
                    "Sandbox",
                    headers={
                        **CUT_ANSWER,
                        **REVISION_ANSWER,
                        RESTORED_HEADER: "The revision whose record was re-applied.",
                    },
                )
            },
            {
                **_WRITE_ERRORS,
                400: "INVALID_REVISION, UNKNOWN_FIELD, INVALID_TYPE; and the validation codes of the record restored "
                "(a preset removed from the configuration since, say).",
                403: _SANDBOX_WRITE_403,
                404: "SANDBOX_NOT_FOUND. REVISION_NOT_FOUND: no such revision among the recent ones, or no previous.",
                409: "PROFILE_IMMUTABLE: the revision's profile differs from the one in force (the sandbox was "
                "deleted and created again). ADDRESS_IN_USE: another sandbox holds one of its addresses now.",
            },
            body=Body("RestoreRequest", {"previous": {}, "by-id": {"revision": "r0123456789ab"}}),
            description="The record goes through the same checks, live cut and answer as a replace (PUT). "
            + _PROFILE_SCOPE,
        ),
        RouteSpec(
            "GET",
            f"{sandbox_id}/policy",
            sandbox_policy,
            "sandboxes:read",
            "sandboxes.policy",
            "The effective compiled policy",
            "sandboxes",
            {200: Answer("What the data plane enforces.", "EffectivePolicy")},
            {404: None},
        ),
        RouteSpec(
            "GET",
            f"{sandbox_id}/explain",
            explain,
            "sandboxes:read",
            "sandboxes.explain",
            "Would this connection be allowed, and by which rule?",
            "sandboxes",
            {200: Answer("The verdict (allowed or not: both are 200).", "Explain")},
            {
                400: "INVALID_PORT, INVALID_ADDRESS, INVALID_HOSTNAME, INVALID_PROTOCOL, MISSING_FIELD (neither host "
                "nor address; tcp/udp without a port), INVALID_METHOD, INVALID_PATH, INVALID_PARAMETER (method or "
                "path with a protocol other than tls or http), UNKNOWN_PARAMETER.",
                404: None,
            },
            query=(
                Query(
                    "host",
                    {"type": "string"},
                    "The name (TLS SNI / HTTP Host / DNS question), optionally with the port: name, name:port, "
                    "[v6]:port. An address here means a connection that carries no name.",
                ),
                Query("port", PORT_SCHEMA, "Default: 443 for tls, 80 for http; required for tcp and udp."),
                Query("address", {"type": "string"}, "The destination address, for CIDR rules."),
                Query(
                    "protocol",
                    {"type": "string", "enum": list(PROTOCOLS), "default": "tls"},
                    "dns asks whether the name would resolve (decided on the name alone).",
                ),
                Query(
                    "method",
                    {"type": "string", "maxLength": MAX_EXPLAIN_METHOD},
                    "An HTTP request on the connection (tls or http; default GET when path is given): for a host an "
                    "egress.inspect entry marks, the answer's `http` is the inspection tier's decision of it.",
                ),
                Query(
                    "path",
                    {"type": "string", "maxLength": MAX_EXPLAIN_PATH},
                    "The request's path (default /); a query is ignored, as the tier decides without it.",
                ),
            ),
        ),
        RouteSpec(
            "POST",
            f"{sandbox_id}/policy/diff",
            policy_diff,
            "audit:read",
            "sandboxes.policy_diff",
            "Replay the recorded flows and DNS queries against a candidate policy: what it would newly deny or allow",
            "sandboxes",
            {200: Answer("The diff; nothing is applied.", "PolicyDiff")},
            {
                400: "The candidate's validation codes, as a PUT of it would give them; INVALID_PARAMETER (since), "
                "UNKNOWN_PARAMETER, INVALID_JSON.",
                404: "SANDBOX_NOT_FOUND.",
                409: "PROFILE_IMMUTABLE: the candidate's profile differs from the stored one. ADDRESS_IN_USE.",
                413: None,
                415: None,
                503: f"{_AUDIT_DISABLED} REPLAY_BUSY: a diff or a suggestion is reading the flow log (one at a time).",
            },
            body=Body(
                "SandboxReplace",
                {name: {k: v for k, v in record.items() if k != "id"} for name, record in SANDBOX_EXAMPLES.items()},
            ),
            query=(
                Query(
                    "since",
                    {"type": "string", "pattern": "^[1-9][0-9]{0,6}[smhd]$", "default": DEFAULT_SINCE},
                    f"How far back to replay: 90s, 30m, 24h, 7d (at most {MAX_SINCE_SECONDS // 86400}d).",
                ),
            ),
            description="The body is the candidate sandbox record, as a PUT would take it (parsed and checked "
            "the same way, with the same errors, and compiled over the template it names). Each distinct (name, "
            "address, port, protocol) of the records in the window is decided once under the candidate and "
            "compared with the recorded verdict (a recorded would_deny passed). Flows that carried no name are "
            "decided by address only (by_address_only: a name learned from the gateway's DNS could decide them "
            "otherwise); records a guard, a limit or the inspection tier decided, and tunnel requests, are not "
            "replayed but counted in not_replayed. Needs audit:read: the answer names the sandbox's destinations.",
        ),
        RouteSpec(
            "GET",
            f"{sandbox_id}/policy/suggest",
            policy_suggest,
            "audit:read",
            "sandboxes.policy_suggest",
            "The smallest allowlist that would have allowed the recorded flows and DNS queries, as a candidate record",
            "sandboxes",
            {200: Answer("The suggestion and its evidence; nothing is applied.", "PolicySuggestion")},
            {
                400: "INVALID_PARAMETER (since), UNKNOWN_PARAMETER.",
                404: "SANDBOX_NOT_FOUND.",
                409: "SUGGEST_NOT_APPLICABLE: no allowlist applies to the sandbox (profile registry or isolated, "
                "allow_all, allow_internet false). SUGGESTION_TOO_LARGE: more entries than a list holds. "
                "ADDRESS_IN_USE: the record changed meanwhile.",
                503: f"{_AUDIT_DISABLED} REPLAY_BUSY: a diff or a suggestion is reading the flow log (one at a time).",
            },
            query=(
                Query(
                    "since",
                    {"type": "string", "pattern": "^[1-9][0-9]{0,6}[smhd]$", "default": DEFAULT_SINCE},
                    f"How far back to read: 90s, 30m, 24h, 7d (at most {MAX_SINCE_SECONDS // 86400}d).",
                ),
            ),
            description="A GET: it takes no body and changes nothing. The window's flows and DNS questions the "
            "sandbox's allowlist decided (allowed, denied, or would-deny in report mode) become allow_hosts "
            "entries (a name with its port unless host_ports covers it, 443 by default; three or more names one "
            "label under a parent that is no public suffix (the Public Suffix List) as `*.parent`) and, "
            "for flows that carried no name, /32 or /128 allow_cidrs entries with their ports in allow_ports. "
            "Records a built-in guard, a limit or a rule the record keeps decided are counted in `excluded`, never "
            "listed. `record` is the current record with those lists replaced (the enforcement mode stays), "
            "checked as a PUT would check it. Needs audit:read: the answer names the sandbox's destinations.",
        ),
        RouteSpec(
            "GET",
            f"{sandbox_id}/audit-batches",
            list_audit_batches,
            "audit:read",
            "audit.list",
            "List the sandbox's flow record batches, oldest first",
            "audit",
            {200: Answer("One page of batches in chronological order.", "AuditBatchList")},
            {
                400: "INVALID_PARAMETER (since_us, limit), INVALID_CONTINUATION_TOKEN, UNKNOWN_PARAMETER.",
                404: "SANDBOX_NOT_FOUND: no such sandbox and no batches for that id.",
                503: _AUDIT_DISABLED,
            },
            query=(
                Query(
                    "since_us",
                    {"type": "integer", "minimum": 0, "default": 0},
                    "Only batches whose first record was written at or after this time (µs since the epoch).",
                ),
                Query("continuation_token", {"type": "string"}, "Opaque; from the previous page."),
                Query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": 100}),
            ),
            description="Audit batches: NDJSON files named {ts_us}-{pid}.ndjson whose lexical order is "
            "chronological. Follow next_continuation_token until it is null. Batches outlive the sandbox's record: "
            "a deleted sandbox's batches stay listable.",
        ),
        RouteSpec(
            "GET",
            f"{sandbox_id}/audit-batches/{{name}}",
            get_audit_batch,
            "audit:read",
            "audit.get",
            "Fetch one batch",
            "audit",
            {
                200: Answer(
                    "NDJSON: one FlowRecord (see components.schemas.FlowRecord) per line.", {"type": "string"}, NDJSON
                )
            },
            {
                400: "INVALID_BATCH_NAME: not a {ts_us}-{pid}.ndjson name. UNKNOWN_PARAMETER.",
                404: "SANDBOX_NOT_FOUND, BATCH_NOT_FOUND.",
                503: _AUDIT_DISABLED,
            },
        ),
        RouteSpec(
            "GET",
            f"{sandbox_id}/dns-log",
            dns_log,
            "audit:read",
            "dns.log",
            "The sandbox's recent DNS queries, oldest first",
            "audit",
            {200: Answer("The last `limit` queries the interceptor answered for this sandbox.", "DnsLog")},
            {
                400: "INVALID_PARAMETER (limit), UNKNOWN_PARAMETER.",
                404: "SANDBOX_NOT_FOUND.",
                503: "DNS_DISABLED: the gateway runs without the data plane (gateway run --data-plane).",
            },
            query=(Query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_DNS_LOG, "default": 100}),),
            description="The per-sandbox query log: name, type, answer or rcode, latency, and whether the policy "
            "allowed it and why. Kept in memory (dns.query_log_size per sandbox); every query is also a flow record "
            "in the audit batches.",
        ),
        RouteSpec(
            "GET",
            "/v1/denials/{id}",
            get_denial,
            "audit:read",
            "denials.get",
            "Look up a denial by the id the sandbox was told",
            "audit",
            {200: Answer("The denial's flow record.", "FlowRecord")},
            {
                400: "INVALID_PARAMETER: not a denial id (8 hex digits, '-', 10 hex digits).",
                404: "DENIAL_NOT_FOUND: no such denial in the records kept (recent ones in memory, older ones in the "
                "audit batches written around the id's time).",
                503: _AUDIT_DISABLED,
            },
            description="Every denial gets an id, told the sandbox in the 403's X-Gateway-Denial-Id header and "
            "body and in the DNS answer's Extended DNS Error text, and kept in its flow record (`denial_id`): a "
            "user quotes it, the operator finds here which rule refused what, and the operator's message "
            "(egress.deny_messages) they were shown.",
        ),
        RouteSpec(
            "GET",
            "/v1/flows/stream",
            stream_flows,
            "audit:read",
            "flows.stream",
            "Follow the flow records live",
            "audit",
            {
                200: Answer(
                    "NDJSON, chunked, until the client leaves: one FlowRecord (components.schemas.FlowRecord) per line "
                    'as each is decided; an empty line when nothing happened for a while; {"note":"lagged","dropped":n}'
                    " when this reader fell behind and n records were skipped.",
                    {"type": "string"},
                    NDJSON,
                )
            },
            {
                400: "INVALID_ID (sandbox), INVALID_PARAMETER (verdict), UNKNOWN_PARAMETER.",
                503: "AUDIT_DISABLED: the gateway runs without a flow log. TOO_MANY_SUBSCRIBERS: "
                "audit.max_stream_subscribers live views are served already.",
            },
            query=(
                Query("sandbox", {"type": "string"}, "Only this sandbox's records."),
                Query("verdict", {"type": "string", "enum": list(VERDICTS)}, "Only records with this verdict."),
            ),
            description="The live view of every flow record the gateway (every worker of it) decides from now on, "
            "the records the audit batches get. Each reader has a bounded buffer: one that does not keep up loses "
            "records (said by a lagged note), it never slows the data plane.",
        ),
        RouteSpec(
            "GET",
            f"{sandbox_id}/tunnels",
            list_tunnels,
            "tunnels:read",
            "tunnels.list",
            "List the sandbox's tunnels (live and recently ended), oldest first",
            "tunnels",
            {200: Answer("The tunnels; passwords are never returned.", "TunnelList")},
            {404: "SANDBOX_NOT_FOUND.", 503: _TUNNELS_DISABLED},
        ),
        RouteSpec(
            "POST",
            f"{sandbox_id}/tunnels",
            create_tunnel,
            "tunnels:write",
            "tunnels.create",
            "Expose a sandbox port at a temporary HTTPS URL",
            "tunnels",
            {201: Answer("Created.", "Tunnel", headers={"Location": "/v1/tunnels/{id}"})},
            {
                **_WRITE_ERRORS,
                400: "MISSING_FIELD, UNKNOWN_FIELD, INVALID_TYPE, INVALID_PORT, INVALID_LABEL, INVALID_PASSWORD, "
                "INVALID_TTL, INVALID_JSON.",
                403: "INSUFFICIENT_SCOPE; INGRESS_PORT_NOT_ALLOWED (the port is not in the sandbox's ingress.ports), "
                "INGRESS_PASSWORD_REQUIRED (its ingress.public_access is false and no password).",
                404: "SANDBOX_NOT_FOUND.",
                409: "TOO_MANY_TUNNELS: the sandbox already has the most live tunnels allowed (20 by default).",
                503: _TUNNELS_DISABLED,
            },
            body=Body("TunnelCreate", TUNNEL_EXAMPLES),
            description="The URL is https://<random>.<tunnel domain>/ with 80 random bits, never derived from the "
            "sandbox id. The tunnel ends at expires_at, when revoked, or when the sandbox is deleted; live "
            "connections (WebSockets and streams included) are closed then.",
        ),
        RouteSpec(
            "GET",
            "/v1/tunnels/{id}",
            get_tunnel,
            "tunnels:read",
            "tunnels.get",
            "Get a tunnel",
            "tunnels",
            {200: Answer("The tunnel.", "Tunnel")},
            {404: "TUNNEL_NOT_FOUND.", 503: _TUNNELS_DISABLED},
        ),
        RouteSpec(
            "DELETE",
            "/v1/tunnels/{id}",
            revoke_tunnel,
            "tunnels:write",
            "tunnels.revoke",
            "Revoke a tunnel (idempotent); its live connections are closed on every node",
            "tunnels",
            {200: Answer("The tunnel as revoked.", "Tunnel")},
            {404: "TUNNEL_NOT_FOUND.", 503: _TUNNELS_DISABLED},
        ),
        RouteSpec(
            "GET",
            "/v1/templates",
            list_templates,
            "templates:read",
            "templates.list",
            "List templates",
            "templates",
            {200: Answer("Templates sorted by name.", "TemplateList")},
        ),
        RouteSpec(
            "POST",
            "/v1/templates",
            create_template,
            "templates:write",
            "templates.create",
            "Create a template",
            "templates",
            {201: Answer("Created.", "Template", headers={"Location": "/v1/templates/{name}"})},
            {**_WRITE_ERRORS, 409: "TEMPLATE_EXISTS: the name is taken."},
            body=Body("TemplateCreate", TEMPLATE_EXAMPLES),
        ),
        RouteSpec(
            "GET",
            "/v1/templates/{name}",
            get_template,
            "templates:read",
            "templates.get",
            "Get a template",
            "templates",
            {200: Answer("The record.", "Template")},
            {404: None},
        ),
        RouteSpec(
            "PUT",
            "/v1/templates/{name}",
            replace_template,
            "templates:write",
            "templates.replace",
            "Replace a template (it must exist; create with POST)",
            "templates",
            {200: Answer("Replaced; sandboxes using it are recompiled at once.", "Template", headers=CUT_ANSWER)},
            {**_WRITE_ERRORS, 404: None},
            body=Body("TemplateReplace", TEMPLATE_EXAMPLES),
        ),
        RouteSpec(
            "DELETE",
            "/v1/templates/{name}",
            delete_template,
            "templates:write",
            "templates.delete",
            "Delete a template",
            "templates",
            {204: Answer("Deleted.")},
            {404: None, 409: "TEMPLATE_IN_USE: sandboxes still use it; the message names them.", 503: None},
        ),
    )


def create_app(
    store: PolicyStore,
    *,
    host: str,
    port: int,
    tokens: Sequence[ApiToken],
    flows: FlowLog | None = None,
    tunnels: TunnelStore | None = None,
    dns: QueryLog | None = None,
    data_plane_status: Callable[[], dict[str, Any]] | None = None,
    unready: Callable[[], list[str]] | None = None,
    draining: Callable[[], bool] | None = None,
    inspection_excluded: Callable[[str], bool] | None = None,
    dial_refusal: DialRefusal | None = None,
    metrics: Callable[[], bytes] | None = None,
) -> web.Application:
    """The API over `store` (started by the caller), listening at `host`:`port` (the [api] section, with the
    `tokens` that may call it); and, when given, the flow log's audit
    batches (without one those routes answer 503 AUDIT_DISABLED), the tunnel store (without it, 503
    TUNNELS_DISABLED) and the DNS interceptor's query log (without it, 503 DNS_DISABLED). `unready` says what
    else must serve before /readyz is 200 (the data plane's parts), `draining` whether the gateway is shutting
    down (then /readyz is 503 DRAINING); `inspection_excluded` which marked hosts stay opaque and
    `dial_refusal` the data plane's address guards, both for explain; `metrics` renders GET /metrics (without it
    the answer is empty). Raises CONFIG_INVALID for an exposed API without tokens."""
    check_api_exposure(host, tokens)
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED_REQUESTS)  # once: the same filter is not added twice
    app = web.Application(middlewares=[_middleware], client_max_size=MAX_BODY_BYTES)
    app[STORE_KEY] = store
    app[TOKENS_KEY] = ApiTokens(host, tokens)
    app[WRITE_LOCK_KEY] = asyncio.Lock()
    app[REPLAY_LOCK_KEY] = asyncio.Lock()
    app[READINESS_KEY] = unready or list
    app[DRAINING_KEY] = draining or (lambda: False)
    app[INSPECTION_EXCLUDED_KEY] = inspection_excluded or (lambda host: False)
    app[DIAL_REFUSAL_KEY] = dial_refusal or (lambda policy, address, port: None)
    if flows is not None:
        app[FLOWS_KEY] = flows
    if tunnels is not None:
        app[TUNNELS_KEY] = tunnels
    if dns is not None:
        app[DNS_KEY] = dns
    if data_plane_status is not None:
        app[DATA_PLANE_STATUS_KEY] = data_plane_status
    if metrics is not None:
        app[METRICS_KEY] = metrics
    table: dict[tuple[str, str], RouteSpec] = {}
    specs = route_specs()
    # Rendered once: the document only changes with the code.
    app[DOCUMENT_KEY] = json.dumps(openapi_document(specs)).encode()
    for spec in specs:
        # add_route, not add_get: no implicit HEAD routes, so the route table is exactly the documented one.
        app.router.add_route(spec.method, spec.path, spec.handler, name=spec.action)
        table[(spec.method, spec.path)] = spec
    app[ROUTES_KEY] = table
    if not tokens:
        app.on_startup.append(_warn_open(host, port))
    return app


def _warn_open(host: str, port: int) -> Callable[[web.Application], Awaitable[None]]:
    async def warn(_app: web.Application) -> None:
        log.warning(
            "api.open_mode",
            message="NO API TOKENS CONFIGURED: every local process can read and change every policy. "
            "The API listens on loopback only; add [[api.tokens]] to require authentication.",
            host=host,
            port=port,
        )

    return warn
