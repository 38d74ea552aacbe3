"""The DNS interceptor's options: its `[dns]` section, plus the port and upstreams it takes from `[egress]` and
`[resolver]` (`supplied`: `gateway.settings` passes them when it builds the section; not options of [dns])."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from msgspec import Meta

from gateway.config import LIVE, OptionError, Section

#: IXFR, AXFR and ANY are always refused.
NEVER_FORWARDED = frozenset({251, 252, 255})
#: Labels shorter than this are never judged random (max_label_alternations): short random-looking labels are
#: common on purpose (CDN ids such as d1a2b3c4.cloudfront.net) and carry little.
RANDOM_MIN_LENGTH = 20


class DnsConfig(Section, frozen=True):
    """The DNS interceptor (its port is egress.dns_port, its upstreams [resolver]).

    egress.rate_limit_max_wait is deliberately not used: its default (5 s) is as long as a stub resolver
    waits for an answer, so a throttled query would time out instead."""

    supplied: ClassVar[frozenset[str]] = frozenset({"port", "upstreams", "upstream_timeout", "min_ttl", "max_ttl"})

    port: int = 15053
    upstreams: tuple[str, ...] = ()  # empty: /etc/resolv.conf
    upstream_timeout: float = 2.0
    #: TTLs of forwarded answers are clamped to [min_ttl, max_ttl]; negative answers to [min_ttl, negative_max_ttl].
    min_ttl: int = 5
    max_ttl: int = 3600

    malware_blocklist: Annotated[
        Path | None,
        Meta(
            description="Operator malware-domain list (hosts-file format or one name per line, # comments): the "
            "names and their subdomains are answered NXDOMAIN in every profile. Re-read when the file changes."
        ),
    ] = None
    blocklist_check_interval: Annotated[
        float, Meta(ge=0.05, le=3600, description="Seconds between checks of the malware list for changes.")
    ] = 1.0
    blocked_ttl: Annotated[
        int,
        Meta(
            ge=0,
            le=86_400,
            description="TTL (and SOA minimum) of blocked and synthetic answers: small, so that a policy change is "
            "seen by the sandbox's own caches within seconds.",
            extra=LIVE,
        ),
    ] = 10
    negative_max_ttl: Annotated[
        int, Meta(ge=0, le=86_400, description="Cap for cached negative answers.", extra=LIVE)
    ] = 300
    other_qtypes: Annotated[
        Literal["empty", "refuse"],
        Meta(
            description="For names a registry/allowlisted policy allows, types other than A/AAAA (HTTPS/SVCB are "
            'always answered empty): "empty" (NOERROR, no records: a stub resolver takes it as "no such data" '
            'and moves on) or "refuse" (REFUSED).',
            extra=LIVE,
        ),
    ] = "empty"
    extra_qtypes: Annotated[
        frozenset[int], Meta(description="Types forwarded like A/AAAA (e.g. [33] for SRV, 16 for TXT).", extra=LIVE)
    ] = frozenset()
    require_ad: Annotated[
        bool,
        Meta(
            description="DNSSEC strict mode: SERVFAIL when the (validating) upstream does not set AD for an "
            "allowed name.",
            extra=LIVE,
        ),
    ] = False
    cache_per_sandbox: Annotated[
        int,
        Meta(
            ge=0,
            le=10_000_000,
            description="Per-sandbox answer cache (never shared between sandboxes). The responses kept per query "
            "packet (a repeated query is answered from them) are bounded the same way, separately (under 1 KiB each).",
        ),
    ] = 2048
    cache_total: Annotated[int, Meta(ge=0, le=100_000_000, description="The caches' global bound.")] = 200_000
    rate_limit_max_wait: Annotated[
        float,
        Meta(
            ge=0,
            le=30,
            description="Over dns_queries_per_minute a query waits at most this long (s), then is answered REFUSED "
            "(well under the 1-5 s a stub resolver waits before it retries).",
            extra=LIVE,
        ),
    ] = 1.0
    tcp_idle_timeout: Annotated[
        float, Meta(ge=0.1, le=3600, description="Seconds a silent DNS-over-TCP client is kept.", extra=LIVE)
    ] = 10.0
    tcp_max_connections: Annotated[
        int, Meta(ge=1, le=1_000_000, description="DNS-over-TCP connections in total.", extra=LIVE)
    ] = 1024
    tcp_max_per_sandbox: Annotated[int, Meta(ge=1, le=1_000_000, description="...and per sandbox.", extra=LIVE)] = 64
    max_inflight: Annotated[
        int,
        Meta(
            ge=1,
            le=10_000_000,
            description="Queries being answered at once (UDP and TCP); beyond this UDP queries are dropped (the "
            "client retries), so a flood cannot pile up tasks.",
            extra=LIVE,
        ),
    ] = 4096
    max_inflight_per_sandbox: Annotated[
        int, Meta(ge=1, le=10_000_000, description="...and per sandbox.", extra=LIVE)
    ] = 256
    name_budget: Annotated[
        int,
        Meta(
            ge=0,
            le=1_000_000,
            description="Distinct names a sandbox may send upstream per budget_window under wildcard allow entries "
            "(and in report mode, names only report mode lets through; exact entries never count): past it a new name "
            "is REFUSED (EDE DNS_NAME_BUDGET) until the window moves on; names already asked in the window keep "
            "resolving. 0: off.",
            extra=LIVE,
        ),
    ] = 200
    nxdomain_budget: Annotated[
        int,
        Meta(
            ge=0,
            le=1_000_000,
            description="...and of those, names the upstream answered NXDOMAIN: past it a new name is REFUSED "
            "(EDE DNS_NXDOMAIN_BUDGET). 0: off.",
            extra=LIVE,
        ),
    ] = 50
    budget_window: Annotated[
        float,
        Meta(ge=1, le=86_400, description="Seconds of the sliding window the two budgets count over.", extra=LIVE),
    ] = 60.0
    max_label_length: Annotated[
        int,
        Meta(
            ge=0,
            le=63,
            description="Longest label a wildcard allow entry matches (63 is the protocol's); a longer one is "
            "NXDOMAIN (EDE DNS_LABEL_LENGTH) and never goes upstream. 0: off.",
            extra=LIVE,
        ),
    ] = 40
    max_label_alternations: Annotated[
        int,
        Meta(
            ge=0,
            le=63,
            description=f"A label of {RANDOM_MIN_LENGTH} characters or more that a wildcard allow entry matches is "
            "NXDOMAIN (EDE DNS_LABEL_RANDOM) when it switches between letters and digits more often than this: "
            "encoded data (hex, base32, base36) switches every 2-3 characters (a median of 9-18 times in 20-40 "
            "characters), names made of words and numbers a handful of times. 0: off.",
            extra=LIVE,
        ),
    ] = 8
    query_log_size: Annotated[
        int, Meta(ge=0, le=1_000_000, description="Entries kept per sandbox in the query log.")
    ] = 1000

    def __post_init__(self) -> None:
        for qtype in sorted(self.extra_qtypes):
            if not 1 <= qtype <= 65535 or qtype in NEVER_FORWARDED:
                raise OptionError("extra_qtypes", f"{qtype} is not a type that can be forwarded")
