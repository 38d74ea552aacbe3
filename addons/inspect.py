"""The inspection tier's mitmproxy addon: a thin shell that applies `addons/enforce.py` to mitmproxy's hooks.

Loaded once by the tier's process, `python -m gateway.tier.proxy --addon <this file>`, beside the tier's hand-over
listener (`gateway.tier.handover`, which owns the option `gateway_token`) and none of mitmdump's other addons, with
these options of its own:
- `gateway_records_fd`: a pipe the supervisor reads, one flow record (`gateway.flowlog.render`) per line;
- `gateway_secrets`: the path of a JSON file {name: value} the supervisor writes for this process, owner-only
  (mode 0600 or stricter; anything looser is refused). A file, not the environment or the command line: those
  are readable by more processes (/proc/<pid>/environ, ps) and are inherited by children.
The addon refuses to run (OptionsError: the tier's process exits at start-up) outside that process (no hand-over
listener), or unless mitmproxy's `validate_inbound_headers` is on (it refuses most smuggling shapes) and
`connection_strategy` is `lazy` (`REQUIRED_OPTIONS`): a request refused here then never opens an upstream
connection, and the client's ALPN (HTTP/2) does not depend on the origin's.

Every connection comes with the `InspectionContext` the engine handed it over with (the listener's `contexts`, per
client connection), so every HTTP/2 stream and keep-alive request of that connection is decided against it. A
request on a connection without one is answered 407 and never proxied.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from mitmproxy import ctx, exceptions, http
from OpenSSL import SSL

from gateway.addons.enforce import (
    MAX_RECORD_PATH,
    MAX_RECORD_REASON,
    MAX_SCRUB_BYTES,
    Decision,
    Scrubber,
    credential_headers,
    decide,
    names_sni,
    parse_secrets,
    request_path,
    scrubber_for,
)
from gateway.flowlog import FlowRecord, FlowVerdict, new_denial_id, render
from gateway.inspection import InspectionContext
from gateway.peek.http1 import forbidden_parts

if TYPE_CHECKING:
    from mitmproxy import connection, tls
    from mitmproxy.addonmanager import Loader

log = logging.getLogger("gateway.inspect")

#: mitmproxy options this addon's guarantees rest on (see the module doc); any other value is refused.
REQUIRED_OPTIONS: Final[dict[str, object]] = {"validate_inbound_headers": True, "connection_strategy": "lazy"}

#: flow.metadata key: this flow's answer was made here (policy refusal), not by the origin.
_REFUSED: Final = "gateway_refused"
_DENIAL_ID: Final = "gateway_denial_id"
_STARTED: Final = "gateway_started_us"


def _event(event: str, **fields: object) -> None:
    """One log line `<event> key=value ...`; never header values or secrets (callers pass neither)."""
    log.warning("%s %s", event, " ".join(f"{key}={value!r}" for key, value in fields.items()))


def _answer(
    flow: http.HTTPFlow, status: int, reason: str, rule: str, extra: dict[str, str] | None = None
) -> http.Response:
    """The tier's refusal of `flow`, with a denial id of its own (in the answer and, later, the request's record)."""
    flow.metadata[_REFUSED] = reason
    denial_id = flow.metadata[_DENIAL_ID] = new_denial_id()
    headers, body = forbidden_parts(reason, rule, denial_id=denial_id)
    return http.Response.make(status, body, dict(headers) | (extra or {}))


def read_secrets(path: str) -> dict[str, str]:
    """The `gateway_secrets` file ("" : no secrets). OptionsError (mitmproxy then refuses the option, and at
    start-up does not run) when it is not owner-only, not this user's, or not a valid secrets object."""
    if not path:
        return {}
    try:
        inherited = re.fullmatch(r"/dev/fd/(\d+)", path)
        # The supervisor hands an inherited memory file as /dev/fd/N (a symlink, which O_NOFOLLOW refuses).
        fd = os.dup(int(inherited[1])) if inherited else os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or info.st_uid != os.getuid():
                raise ValueError("it must be owned by this user and readable by nobody else (mode 0600)")
            return parse_secrets(os.pread(fd, info.st_size, 0).decode("utf-8"))
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:
        raise exceptions.OptionsError(f"gateway_secrets {path}: {exc}") from None


def _no_tls(*, server_side: bool) -> SSL.Connection:
    """A TLS connection that fails at its first step, before it sends anything (no protocol version is
    possible). This addon's hooks run before mitmproxy's own TLS configuration, which fills in any connection
    left empty: so a refusal has to be a connection of its own."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    conn = SSL.Connection(context)
    if server_side:
        conn.set_accept_state()
    else:
        conn.set_connect_state()
    return conn


class Inspect:
    def __init__(self) -> None:
        #: The hand-over listener's contexts (an empty stand-in until `configure` finds the listener).
        self.contexts: Mapping[connection.Client, InspectionContext] = {}
        self.refused_tls: weakref.WeakSet[connection.Client] = weakref.WeakSet()
        self.scrubbers: weakref.WeakKeyDictionary[connection.Client, Scrubber] = weakref.WeakKeyDictionary()
        self.secrets: dict[str, str] = {}
        self.records_fd = -1
        self.records_dropped = 0

    # ------------------------------------------------------------------ options

    def load(self, loader: Loader) -> None:
        loader.add_option("gateway_records_fd", int, -1, "File descriptor for flow records (JSON lines); -1: none.")
        loader.add_option("gateway_secrets", str, "", "Owner-only JSON file {name: value} of credential secrets.")

    def configure(self, updated: set[str]) -> None:
        handover = ctx.master.addons.get("handover")
        if handover is None:
            raise exceptions.OptionsError(
                "the gateway's inspection addon runs in the tier's process (python -m gateway.tier.proxy), whose "
                "hand-over listener tells it what each connection was allowed for"
            )
        self.contexts = handover.contexts
        if updated & set(REQUIRED_OPTIONS):
            found = {name: getattr(ctx.options, name) for name in REQUIRED_OPTIONS}
            if found != REQUIRED_OPTIONS:
                raise exceptions.OptionsError(f"the gateway's inspection addon needs {REQUIRED_OPTIONS}, not {found}")
        if "gateway_secrets" in updated:
            self.secrets = read_secrets(ctx.options.gateway_secrets)
            self.scrubbers.clear()
        if "gateway_records_fd" in updated:
            self.records_fd = ctx.options.gateway_records_fd
            if self.records_fd >= 0:
                # A stalled reader must cost records, never stall the proxy.
                os.set_blocking(self.records_fd, False)

    # ------------------------------------------------------------------ TLS

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        client = data.context.client
        context = self.contexts.get(client)
        if context is None or not names_sni(data.client_hello.sni, context.host):
            _event("inspect.sni_mismatch", sandbox=context and context.sandbox, host=context and context.host,
                   sni=data.client_hello.sni)  # fmt: skip
            self.refused_tls.add(client)

    def tls_start_client(self, data: tls.TlsData) -> None:
        if data.context.client in self.refused_tls:
            data.ssl_conn = _no_tls(server_side=True)

    def tls_start_server(self, data: tls.TlsData) -> None:
        if data.context.client in self.refused_tls:
            data.ssl_conn = _no_tls(server_side=False)

    # ------------------------------------------------------------------ requests

    def _scrubber(self, client: connection.Client, context: InspectionContext) -> Scrubber:
        found = self.scrubbers.get(client)
        if found is None:
            found = self.scrubbers[client] = scrubber_for(context, self.secrets)
        return found

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.metadata[_STARTED] = time.time_ns() // 1000
        try:
            self._decide(flow)
        except Exception as exc:  # mitmproxy would log it and pass the request on: fail closed instead
            log.exception("inspect.request_failed")
            self._refuse(flow, Decision(502, f"the tier failed on this request ({type(exc).__name__})"), "inspect")

    def _decide(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        context = self.contexts.get(flow.client_conn)
        if context is None:
            self._refuse(flow, Decision(407, "no hand-over on this connection", "hand-over"), "inspect")
            return
        decision = decide(
            context,
            http_version=request.http_version,
            method=request.method,
            target=request.path,
            authority=request.authority,
            fields=request.headers.fields,
        )
        rule = f"inspect {context.entry}"
        if not decision.allowed:
            self._refuse(flow, decision, rule)
            return
        bound = credential_headers(context, self.secrets)
        if bound is None:
            missing = Decision(502, "a credential of this entry is not configured in the tier", "secret")
            self._refuse(flow, missing, rule)
            return
        for header, _ in bound:
            if header in request.headers:
                del request.headers[header]  # every copy
        if flow.client_conn.tls_established and request.scheme == "https":
            for header, value in bound:
                request.headers.add(header, value)
        if context.rule.credentials:
            request.headers["Accept-Encoding"] = "identity"  # text the scrubber can read

    def _refuse(self, flow: http.HTTPFlow, decision: Decision, rule: str) -> None:
        flow.request.stream = False  # mitmproxy cannot both answer now and stream the body on
        extra = {"Proxy-Authenticate": 'Basic realm="gateway"'} if decision.status == 407 else None
        flow.response = _answer(flow, decision.status, decision.reason, rule, extra)

    # ------------------------------------------------------------------ responses

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        context = self.contexts.get(flow.client_conn)
        if context is not None and context.rule.credentials and flow.response is not None:
            flow.response.stream = False  # scrubbed whole, in `response`

    def response(self, flow: http.HTTPFlow) -> None:
        context = self.contexts.get(flow.client_conn)
        response = flow.response
        if context is not None and response is not None and _REFUSED not in flow.metadata:
            rule = f"inspect {context.entry}"
            try:
                scrubber = self._scrubber(flow.client_conn, context)
                if scrubber:
                    self._scrub(flow, response, scrubber, rule)
            except Exception as exc:  # never pass on what was not scrubbed
                log.exception("inspect.scrub_failed")
                reason = f"the tier failed to scrub this response ({type(exc).__name__})"
                flow.response = _answer(flow, 502, reason, rule)
        self._record(flow)

    def _scrub(self, flow: http.HTTPFlow, response: http.Response, scrubber: Scrubber, rule: str) -> None:
        raw = response.raw_content or b""
        try:
            body = response.get_content(strict=True) or b""
        except ValueError:
            body = None
        if body is None or len(raw) > MAX_SCRUB_BYTES or len(body) > MAX_SCRUB_BYTES:
            reason = "the response of a host with credentials is too large or not decodable to be scrubbed"
            flow.response = _answer(flow, 502, reason, rule)
            return
        clean = scrubber.data(body)
        if clean != body:
            response.content = clean
        for headers in (response.headers, response.trailers):
            if headers is not None:
                headers.fields = tuple((name, scrubber.data(value)) for name, value in headers.fields)
        if response.reason:
            response.reason = scrubber.text(response.reason)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        context = self.contexts.get(flow.client_conn)
        if context is None or flow.websocket is None:
            return
        message = flow.websocket.messages[-1]
        if not message.from_client:
            scrubber = self._scrubber(flow.client_conn, context)
            if scrubber:
                message.content = scrubber.data(message.content)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            self._record(flow)

    # ------------------------------------------------------------------ records

    def _record(self, flow: http.HTTPFlow) -> None:
        context = self.contexts.get(flow.client_conn)
        if context is None or self.records_fd < 0 or _STARTED not in flow.metadata:
            return
        response = flow.response
        refused = flow.metadata.get(_REFUSED)
        verdict: FlowVerdict
        if refused is not None:
            verdict, reason = "deny", str(refused)
        elif response is None:
            verdict, reason = "allow", f"upstream error: {flow.error.msg if flow.error else 'no response'}"
        else:
            verdict, reason = "allow", "request allowed by the entry's HTTP rules"
        end_us = time.time_ns() // 1000
        start_us: int = flow.metadata[_STARTED]
        dst = flow.server_conn.address or ("", 0)
        record = FlowRecord(
            start_us=start_us,
            end_us=end_us,
            sandbox=context.sandbox,
            src_addr=context.src_addr,
            src_port=context.src_port,
            dst_addr=str(dst[0]),
            dst_port=int(dst[1]),
            orig_dst_addr=context.orig_dst_addr,
            orig_dst_port=context.orig_dst_port,
            hostname=context.host,
            protocol="https" if flow.client_conn.tls_established else "http",
            bytes_up=len(flow.request.raw_content or b""),
            bytes_down=len(response.raw_content or b"") if response is not None else 0,
            duration_ms=(end_us - start_us) / 1000,
            verdict=verdict,
            reason=reason[:MAX_RECORD_REASON],
            rule=f"inspect {context.entry}",
            method=flow.request.method[:20],
            path=request_path(flow.request.path)[:MAX_RECORD_PATH],
            status=response.status_code if response is not None else None,
            denial_id=flow.metadata.get(_DENIAL_ID),
            revision=context.revision,  # the policy whose entry decided this request (the hand-over's)
        )
        self._write((render(record) + "\n").encode())

    def _write(self, line: bytes) -> None:
        try:
            os.write(self.records_fd, line)  # below PIPE_BUF: whole or not at all
        except (BlockingIOError, BrokenPipeError, OSError) as exc:
            self.records_dropped += 1
            if self.records_dropped == 1 or self.records_dropped % 1000 == 0:
                _event("inspect.records_dropped", dropped_total=self.records_dropped, error=type(exc).__name__)


addons: Final[list[Any]] = [Inspect()]
