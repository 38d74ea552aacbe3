"""The control API of a running `gateway run`, called over HTTP the way an operator's client does; every
answer is checked against the OpenAPI document (the one the gateway serves, which must be the documented one)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from tests.factory import ADMIN_TOKEN, DOC, Answer, check_documented


class ProductApi:
    def __init__(self, url: str, token: str | None = ADMIN_TOKEN) -> None:
        self.url = url
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "",
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        expect: int | None = None,
    ) -> Answer:
        """`token=""` means this client's token, `None` none at all."""
        sent = dict(headers or {})
        bearer = self.token if token == "" else token
        if bearer is not None:
            sent.setdefault("Authorization", f"Bearer {bearer}")
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=sent, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, raw, answer_headers = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            status, raw, answer_headers = error.code, error.read(), dict(error.headers)
        text = raw.decode()
        media = answer_headers.get("Content-Type", "").split(";", 1)[0].strip()
        parsed = json.loads(text) if text and media == "application/json" else (text or None)
        answer = Answer(status, parsed, answer_headers)
        check_documented(method, path.split("?", 1)[0], answer)
        if expect is not None:
            assert answer.status == expect, f"{method} {path}: {answer.status} {text}"
        return answer

    @classmethod
    def checked(cls, url: str) -> ProductApi:
        """A client of the gateway at `url`, whose served document was found to be the documented one."""
        client = cls(url)
        client.check_served_document()
        return client

    def check_served_document(self) -> None:
        """The answers are checked against DOC; that is only worth something if DOC is what the gateway serves."""
        served = self.call("GET", "/openapi.json", token=None, expect=200).body
        assert served == json.loads(json.dumps(DOC)), "the served /openapi.json differs from the documented one"
