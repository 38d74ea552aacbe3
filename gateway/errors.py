"""Errors with a stable code, a human message and the offending field.

Every entry point (API, config file, Redis, CLI) reports problems through
`GatewayError`, so a caller always gets `{code, message, field}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from gateway.schema import Note


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """Every error answer. `code` is stable; `message` is for people; `field` names the offending input (a JSON
    path such as egress.allow_hosts[2], a query parameter or a header) or null."""

    code: Annotated[str, Note(pattern="^[A-Z][A-Z0-9_]*$")]
    message: str
    field: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": self.field}


class GatewayError(Exception):
    """A rejected input or operation. `status` is the HTTP status the API answers with."""

    status: int = 400

    def __init__(self, code: str, message: str, field: str | None = None, *, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (field {field})" if field else ""))
        self.code = code
        self.message = message
        self.field = field
        if status is not None:
            self.status = status

    @property
    def body(self) -> ErrorBody:
        return ErrorBody(self.code, self.message, self.field)

    def at(self, prefix: str) -> GatewayError:
        """The same error with its field nested under `prefix` (e.g. `egress` + `allow_hosts[2]`)."""
        field = f"{prefix}.{self.field}" if self.field else prefix
        return GatewayError(self.code, self.message, field, status=self.status)


class NotFound(GatewayError):
    status = 404


class Conflict(GatewayError):
    status = 409


class Forbidden(GatewayError):
    status = 403
