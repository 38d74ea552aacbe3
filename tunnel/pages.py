"""The answers the tunnel gives itself: refusals (HTML for browsers, the `{code, message, field}` JSON for the
rest), the login form and redirects. Pure: a `Page` is status, headers and body, encoded by `encode` for the
request it answers; nothing here reads the store or the connection.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from gateway.tunnel.http1 import simple_response
from gateway.tunnel.model import Tunnel
from gateway.tunnel.wire import Request

#: Paths under this prefix are the gateway's own (login, logout), never the app's.
GATEWAY_PREFIX: Final = "/.gateway/"
LOGIN_PATH: Final = "/.gateway/login"
LOGOUT_PATH: Final = "/.gateway/logout"

ERROR_TITLES: Final = {
    400: "Bad request",
    401: "Sign-in required",
    403: "Forbidden",
    404: "No such preview",
    405: "Method not allowed",
    410: "This preview has ended",
    429: "Too many attempts",
    502: "The app is not answering",
}


@dataclass(frozen=True, slots=True)
class Page:
    """A complete answer the gateway gives itself; `refusal` is the code of what it refuses (a wrong password
    on the login form), the request's reason in its flow record, or "" when it refuses nothing."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    refusal: str = ""


class Refused(Exception):
    """An answer the gateway gives itself (404/410/502...), in HTML for browsers and JSON for the rest. Its
    `code` is the request's reason in the flow record."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def html_page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="robots" content="noindex"><title>{html.escape(title)}</title>
<style>
body{{font:16px/1.5 system-ui,sans-serif;background:#f4f5f7;color:#1d2330;display:flex;min-height:100vh;
margin:0;align-items:center;justify-content:center}}
main{{background:#fff;padding:2rem 2.25rem;border-radius:10px;box-shadow:0 2px 12px #0002;width:min(24rem,90vw)}}
h1{{font-size:1.25rem;margin:0 0 .75rem}} p{{margin:.5rem 0}} .muted{{color:#667085;font-size:.875rem}}
label{{display:block;margin:1rem 0 .25rem;font-weight:600}}
input[type=password]{{width:100%;box-sizing:border-box;padding:.6rem;border:1px solid #c5cad3;border-radius:6px;
font-size:1rem}}
button{{margin-top:1rem;width:100%;padding:.65rem;border:0;border-radius:6px;background:#2f5bea;color:#fff;
font-size:1rem;cursor:pointer}}
.error{{background:#fdecec;color:#a61b1b;padding:.5rem .75rem;border-radius:6px}}
</style></head><body><main>{body}</main></body></html>
"""


def login_page(label: str, next_path: str, error: str | None) -> str:
    error_html = f'<p class="error" role="alert" id="error">{html.escape(error)}</p>' if error else ""
    return html_page(
        f"{label} - sign in",
        f"""<h1>{html.escape(label)}</h1>
<p class="muted">This preview is password protected.</p>{error_html}
<form method="post" action="{LOGIN_PATH}">
<input type="hidden" name="next" value="{html.escape(next_path)}">
<label for="password">Password</label>
<input type="password" id="password" name="password" autocomplete="current-password" required autofocus>
<button type="submit">Continue</button>
</form>""",
    )


def login_response(
    tunnel: Tunnel,
    next_path: str,
    error: str | None,
    status: int,
    headers: dict[str, str] | None = None,
    *,
    refusal: str = "",
) -> Page:
    label = tunnel.label or f"Preview of port {tunnel.port}"
    fields = {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'",
        **(headers or {}),
    }
    return Page(status, header_list(fields), login_page(label, next_path, error).encode(), refusal)


def refusal_page(request: Request, exc: Refused, login_tunnel: Tunnel | None) -> Page:
    """The refusal as the client reads it; a browser asked for a password gets the form of `login_tunnel`."""
    headers = {"Cache-Control": "no-store", **exc.headers}
    if wants_html(request):
        if login_tunnel is not None:
            next_path = safe_next(request.target.decode("latin-1"))
            headers.pop("WWW-Authenticate", None)  # a browser would show its own dialog over the form
            return login_response(login_tunnel, next_path, None, 401, headers, refusal=exc.code)
        title = ERROR_TITLES.get(exc.status, "Error")
        sentence = exc.message[:1].upper() + exc.message[1:]
        body = f"<h1>{html.escape(title)}</h1><p>{html.escape(sentence)}.</p>"
        body += f'<p class="muted">{exc.status} · {html.escape(exc.code)}</p>'
        headers["Content-Type"] = "text/html; charset=utf-8"
        return Page(exc.status, header_list(headers), html_page(title, body).encode(), exc.code)
    headers["Content-Type"] = "application/json; charset=utf-8"
    body_json = json.dumps({"code": exc.code, "message": exc.message, "field": None}).encode()
    return Page(exc.status, header_list(headers), body_json, exc.code)


def encode(page: Page, request: Request, *, close: bool) -> bytes:
    return simple_response(
        page.status,
        page.headers,
        page.body,
        close=close or not request.keep_alive,
        head_request=request.method == b"HEAD",
    )


def header_list(fields: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields.items()]


def see_other(location: str, headers: list[tuple[bytes, bytes]] | None = None) -> Page:
    fields = [(b"Location", location.encode("latin-1")), (b"Cache-Control", b"no-store"), *(headers or ())]
    return Page(303, fields, b"")


def wants_html(request: Request) -> bool:
    return b"text/html" in request.fields.get(b"accept", b"")


def safe_next(value: str) -> str:
    """Only a path on this same host: never `//evil` or a scheme (no open redirect)."""
    if (
        not value.startswith("/")
        or value.startswith("//")
        or value.startswith("/\\")
        or value.startswith(GATEWAY_PREFIX)
    ):
        return "/"
    return quote(value, safe="/?&=%#:@!$'()*+,;~-._")
