"""A small typed client of the control API: the one the `gateway` CLI uses, and the one platform services use.

    client = ApiClient(api_url("127.0.0.1", 8470), token=os.environ["GATEWAY_TOKEN"])
    sandbox = client.create_sandbox({"id": "sb1", "addresses": ["10.64.0.2"]}).data
    allowed = client.explain("sb1", host="api.example.com").data["allowed"]

One method per route the CLI drives (sandboxes, templates, explain, status, presets, tunnels, audit
batches, the DNS log); `request` reaches any other. Every method returns the `ApiResponse` (status
and the body as sent, so a caller can print it verbatim) and raises `ApiError` for an HTTP error
answer (`describe()` gives the API's `CODE: message (field x)`) or `ApiUnreachable` when no answer
came at all. Path segments are percent-encoded here: an id never changes the route.

Synchronous and standard library only (urllib): a command-line call or a platform hook makes a few
requests, and importing an HTTP stack would cost every `gateway` command its start-up time. It never
follows redirects and never uses an HTTP proxy, so the bearer token is only ever sent to the URL given.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TIMEOUT = 15.0


#: Seconds without a byte before a live stream counts as gone (the server sends an empty line every 10).
STREAM_TIMEOUT = 60.0


#: On the answer to a policy write: how many established connections it ended (the live cut).
CUT_HEADER = "X-Gateway-Cut-Flows"
#: On the answer to a sandbox write: the revision of its policy now in force.
REVISION_HEADER = "X-Gateway-Revision"
#: On the answer to a restore: the revision whose record was applied again.
RESTORED_HEADER = "X-Gateway-Restored-Revision"


@dataclass(frozen=True, slots=True)
class ApiResponse:
    status: int
    text: str
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Any:
        return json.loads(self.text) if self.text else None

    @property
    def cut_flows(self) -> int | None:
        """The connections a policy write ended because the new policy no longer allows them (None: not a write)."""
        value = self.headers.get(CUT_HEADER)
        return int(value) if value is not None and value.isdigit() else None


class ApiError(Exception):
    """The API answered with an HTTP error status."""

    def __init__(self, response: ApiResponse) -> None:
        super().__init__(f"HTTP {response.status}")
        self.response = response

    def describe(self) -> str:
        """`CODE: message (field x)`, the same form GatewayError prints."""
        try:
            body = self.response.data
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("code"), str):
            field = body.get("field")
            return f"{body['code']}: {body.get('message', '')}" + (f" (field {field})" if field else "")
        return f"HTTP_{self.response.status}: {self.response.text.strip()[:200] or 'no body'}"


class ApiUnreachable(Exception):
    """No answer from the API (refused, timed out, no route); the message says where and why."""

    def __init__(self, base_url: str, why: str) -> None:
        self.base_url = base_url
        self.why = why
        self.message = (
            f"UNREACHABLE: cannot reach the gateway API at {base_url}: {why} "
            "(is `gateway run` running? set --api or GATEWAY_API_URL)"
        )
        super().__init__(self.message)


def api_url(host: str, port: int) -> str:
    """The URL that reaches an API listening on `host:port` from this host (a wildcard: on loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect would carry the bearer token elsewhere; the API never sends one


class ApiClient:
    """The control API at `base_url`, with a bearer `token` (None: an API without tokens)."""

    def __init__(self, base_url: str, token: str | None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str | None] | None = None,
        content_type: str = "application/json",
    ) -> ApiResponse:
        """Any route: `body` is sent as JSON; query values that are None are left out."""
        with self._open(method, path, body, query, content_type, self.timeout) as answer:
            return ApiResponse(answer.status, answer.read().decode("utf-8", "replace"), dict(answer.headers.items()))

    @contextlib.contextmanager
    def _open(
        self,
        method: str,
        path: str,
        body: Any,
        query: Mapping[str, str | None] | None,
        content_type: str,
        timeout: float,
    ) -> Iterator[Any]:
        """The open answer of a 2xx; ApiError for an error answer, ApiUnreachable for no answer."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(request, timeout=timeout) as answer:
                yield answer
        except urllib.error.HTTPError as exc:
            raise ApiError(ApiResponse(exc.code, exc.read().decode("utf-8", "replace"))) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            why = "connection refused" if isinstance(reason, ConnectionRefusedError) else str(reason)
            raise ApiUnreachable(self.base_url, why) from None
        except (TimeoutError, ConnectionError) as exc:
            raise ApiUnreachable(self.base_url, str(exc) or type(exc).__name__) from None

    # ------------------------------------------------------------------ sandboxes

    def list_sandboxes(self, *, profile: str | None = None, template: str | None = None) -> ApiResponse:
        return self.request("GET", "/v1/sandboxes", query={"profile": profile, "template": template})

    def get_sandbox(self, sandbox_id: str) -> ApiResponse:
        return self.request("GET", f"/v1/sandboxes/{_quote(sandbox_id)}")

    def sandbox_policy(self, sandbox_id: str) -> ApiResponse:
        """The sandbox's effective policy (its template and presets resolved)."""
        return self.request("GET", f"/v1/sandboxes/{_quote(sandbox_id)}/policy")

    def create_sandbox(self, record: Any) -> ApiResponse:
        return self.request("POST", "/v1/sandboxes", record)

    def replace_sandbox(self, sandbox_id: str, record: Any) -> ApiResponse:
        return self.request("PUT", f"/v1/sandboxes/{_quote(sandbox_id)}", record)

    def patch_sandbox(self, sandbox_id: str, patch: Any) -> ApiResponse:
        """An RFC 7396 merge patch."""
        return self.request(
            "PATCH", f"/v1/sandboxes/{_quote(sandbox_id)}", patch, content_type="application/merge-patch+json"
        )

    def delete_sandbox(self, sandbox_id: str) -> ApiResponse:
        return self.request("DELETE", f"/v1/sandboxes/{_quote(sandbox_id)}")

    def sandbox_revisions(self, sandbox_id: str) -> ApiResponse:
        """The sandbox's recent policy revisions, newest (the one in force) first."""
        return self.request("GET", f"/v1/sandboxes/{_quote(sandbox_id)}/revisions")

    def restore_sandbox(self, sandbox_id: str, revision: str | None = None) -> ApiResponse:
        """Re-apply the record of one of its recent revisions (None: the previous one)."""
        body = {} if revision is None else {"revision": revision}
        return self.request("POST", f"/v1/sandboxes/{_quote(sandbox_id)}/restore", body)

    def policy_diff(self, sandbox_id: str, candidate: Any, *, since: str | None = None) -> ApiResponse:
        """What the candidate record would newly deny or allow among the sandbox's recorded flows of the last
        `since` (`24h` when None); nothing is applied."""
        path = f"/v1/sandboxes/{_quote(sandbox_id)}/policy/diff"
        return self.request("POST", path, candidate, query={"since": since})

    def policy_suggest(self, sandbox_id: str, *, since: str | None = None) -> ApiResponse:
        """The smallest allowlist that would have allowed the sandbox's recorded flows of the last `since` (`24h`
        when None), as a candidate record with its evidence; nothing is applied."""
        return self.request("GET", f"/v1/sandboxes/{_quote(sandbox_id)}/policy/suggest", query={"since": since})

    def explain(
        self,
        sandbox_id: str,
        *,
        host: str | None = None,
        address: str | None = None,
        protocol: str | None = None,
        port: str | None = None,
        method: str | None = None,
        path: str | None = None,
    ) -> ApiResponse:
        """Would this connection of the sandbox be allowed? (the verdict, its reason and rule). With `method` or
        `path`, also that HTTP request, as the inspection tier would decide it on a marked host."""
        query = {"host": host, "address": address, "protocol": protocol, "port": port, "method": method, "path": path}
        return self.request("GET", f"/v1/sandboxes/{_quote(sandbox_id)}/explain", query=query)

    # ------------------------------------------------------------------ templates

    def list_templates(self) -> ApiResponse:
        return self.request("GET", "/v1/templates")

    def get_template(self, name: str) -> ApiResponse:
        return self.request("GET", f"/v1/templates/{_quote(name)}")

    def create_template(self, record: Any) -> ApiResponse:
        return self.request("POST", "/v1/templates", record)

    def replace_template(self, name: str, record: Any) -> ApiResponse:
        return self.request("PUT", f"/v1/templates/{_quote(name)}", record)

    def delete_template(self, name: str) -> ApiResponse:
        return self.request("DELETE", f"/v1/templates/{_quote(name)}")

    # ------------------------------------------------------------------ the gateway

    def status(self) -> ApiResponse:
        return self.request("GET", "/v1/status")

    def presets(self) -> ApiResponse:
        return self.request("GET", "/v1/presets")

    # ------------------------------------------------------------------ tunnels

    def expose_tunnel(self, sandbox_id: str, request: Mapping[str, Any]) -> ApiResponse:
        """A new tunnel to a sandbox port (`{"port": ..., "label"?, "ttl"?, "rewrite_host"?, "password"?}`)."""
        return self.request("POST", f"/v1/sandboxes/{_quote(sandbox_id)}/tunnels", request)

    def list_tunnels(self, sandbox_id: str) -> ApiResponse:
        return self.request("GET", f"/v1/sandboxes/{_quote(sandbox_id)}/tunnels")

    def get_tunnel(self, tunnel_id: str) -> ApiResponse:
        return self.request("GET", f"/v1/tunnels/{_quote(tunnel_id)}")

    def revoke_tunnel(self, tunnel_id: str) -> ApiResponse:
        return self.request("DELETE", f"/v1/tunnels/{_quote(tunnel_id)}")

    # ------------------------------------------------------------------ audit

    def audit_batches(
        self, sandbox_id: str, *, since_us: int = 0, limit: int = 100, continuation_token: str | None = None
    ) -> ApiResponse:
        """One page of the sandbox's flow-record batches, oldest first (`next_continuation_token` for the next)."""
        query = {"since_us": str(since_us), "limit": str(limit), "continuation_token": continuation_token}
        return self.request("GET", f"/v1/sandboxes/{_quote(sandbox_id)}/audit-batches", query=query)

    def audit_batch(self, sandbox_id: str, name: str) -> ApiResponse:
        """One batch as NDJSON text (one flow record per line)."""
        return self.request("GET", f"/v1/sandboxes/{_quote(sandbox_id)}/audit-batches/{_quote(name)}")

    def denial(self, denial_id: str) -> ApiResponse:
        """The flow record of the denial with this id (as the sandbox was told it)."""
        return self.request("GET", f"/v1/denials/{_quote(denial_id)}")

    def dns_log(self, sandbox_id: str, *, limit: int = 100) -> ApiResponse:
        """The sandbox's latest DNS queries (needs `gateway run --data-plane`)."""
        return self.request("GET", f"/v1/sandboxes/{_quote(sandbox_id)}/dns-log", query={"limit": str(limit)})

    def stream_flows(self, *, sandbox: str | None = None, verdict: str | None = None) -> Iterator[dict[str, Any]]:
        """GET /v1/flows/stream: each flow record (and each {"note": ...}) as it comes, until the server ends it.
        The socket timeout is generous: a quiet stream sends an empty line every few seconds."""
        query = {"sandbox": sandbox, "verdict": verdict}
        with self._open("GET", "/v1/flows/stream", None, query, "application/json", STREAM_TIMEOUT) as answer:
            for line in answer:
                if line.strip():
                    yield json.loads(line)
