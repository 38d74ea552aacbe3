"""The DNS query log as the control API serves it: the entry's record and what the API reads it from.

Beside the components rather than in either: the DNS interceptor (`gateway.dns.server`) fills `DnsQuery`
when the log is read, the API (`gateway.api`) asks a `QueryLog` for them, and the OpenAPI document derives
the `DnsQuery` schema from the record's fields (`gateway.schema`), so none of the three can name a field the
others do not.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Any, Final, Protocol

from gateway.schema import Note

__all__ = ["DnsQuery", "QueryLog"]


# Not frozen, and turned into a dict without `asdict`: a log read builds up to a thousand of these on the event
# loop the data plane shares, and a frozen __init__ plus `asdict` cost ~10 us each against ~3 us.
@dataclass(slots=True)
class DnsQuery:
    """One DNS query of a sandbox: what it asked, what it was answered, whether its policy allowed it and why."""

    time: Annotated[float, Note(description="Seconds since the epoch.")]
    sandbox: str
    client: Annotated[str, Note(description="The sandbox address and port that asked.")]
    transport: Annotated[str, Note(enum=["udp", "tcp"])]
    name: str
    type: Annotated[str, Note(description="The query type (A, AAAA, HTTPS, ...).")]
    rcode: Annotated[str, Note(description="NOERROR, NXDOMAIN, REFUSED, SERVFAIL, FORMERR, ...")]
    answers: list[str]
    latency_ms: float
    allowed: bool
    code: Annotated[str, Note(description="FORWARDED, CACHED, BLOCKED_POLICY, REFUSED_ISOLATED, ...")]
    reason: str
    rule: str
    cached: bool
    would_deny: Annotated[
        bool, Note(description="Answered only because the policy is in report mode; `rule` would deny it.")
    ]
    denial_id: Annotated[str | None, Note(description="A denial's id (in its EDE text and flow record).")] = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}


FIELDS: Final = tuple(f.name for f in fields(DnsQuery))


class QueryLog(Protocol):
    """What the API reads from the DNS interceptor (handed in by the composition root): its recent queries,
    each a `DnsQuery` as a dict."""

    def query_log(self, sandbox_id: str, limit: int = 100) -> list[dict[str, Any]]: ...
