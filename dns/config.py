"""The DNS interceptor's options: its `[dns]` section, with the port and upstreams it takes from `[egress]` and
`[resolver]`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from gateway.config import Config


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """Options of the DNS interceptor. Defaults are the documented behaviour.

    `from_config` reads what `gateway.config` has today (egress.dns_port, resolver.upstreams/timeout/min_ttl/
    max_ttl); the other fields keep their defaults until a `[dns]` section (`Config.dns`, with attributes named
    like these fields) exists there. `egress.rate_limit_max_wait` is deliberately not used: its default (5 s)
    is as long as a stub resolver waits for an answer, so a throttled query would time out instead.
    """

    port: int = 15053
    upstreams: tuple[str, ...] = ()  # empty: /etc/resolv.conf
    upstream_timeout: float = 2.0
    #: TTLs of forwarded answers are clamped to [min_ttl, max_ttl]; negative answers to [min_ttl, negative_max_ttl].
    min_ttl: int = 5
    max_ttl: int = 3600
    negative_max_ttl: int = 300
    #: TTL and SOA minimum of synthetic answers (blocked names, empty HTTPS): small, so that a policy
    #: change is seen by the sandbox's own caches within seconds.
    blocked_ttl: int = 10
    #: Types other than A, AAAA, HTTPS, SVCB for names the policy allows in `registry` / `allowlisted`:
    #: "empty" answers NOERROR with no records (a stub resolver takes it as "no such data" and moves on;
    #: REFUSED makes many try the next nameserver and report a server failure); "refuse" answers REFUSED.
    other_qtypes: Literal["empty", "refuse"] = "empty"
    #: Types forwarded like A/AAAA in `registry` / `allowlisted` (e.g. 33 for SRV, 16 for TXT). Default none.
    extra_qtypes: frozenset[int] = frozenset()
    #: Operator malware-domain list (hosts-file or one name per line); its names and their subdomains are
    #: answered NXDOMAIN in every profile. Re-read when the file changes.
    malware_blocklist: Path | None = None
    blocklist_check_interval: float = 1.0
    #: DNSSEC strict mode: SERVFAIL when the (validating) upstream does not set AD on an allowed name's answer.
    require_ad: bool = False
    cache_per_sandbox: int = 2048
    cache_total: int = 200_000
    #: Rate limit: a query over the sandbox's dns_queries_per_minute waits at most this long, else REFUSED
    #: (well under the 1-5 s a stub resolver waits before it retries).
    rate_limit_max_wait: float = 1.0
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 1024
    tcp_max_per_sandbox: int = 64
    #: Queries being answered at once (UDP and TCP), in total and per sandbox; beyond that UDP queries
    #: are dropped (the client retries), so a flood cannot pile up tasks.
    max_inflight: int = 4096
    max_inflight_per_sandbox: int = 256
    query_log_size: int = 1000

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> DnsConfig:
        egress, resolver = config.egress, config.resolver
        values: dict[str, Any] = {
            "port": egress.dns_port,
            "upstreams": tuple(resolver.upstreams),
            "upstream_timeout": resolver.timeout,
            "min_ttl": resolver.min_ttl,
            "max_ttl": resolver.max_ttl,
        }
        # Options a later [dns] section may carry; read when present, defaults otherwise.
        dns_section = getattr(config, "dns", None)
        if dns_section is not None:
            for name in cls.__dataclass_fields__:
                if hasattr(dns_section, name):
                    values[name] = getattr(dns_section, name)
        values.update(overrides)
        if isinstance(values.get("malware_blocklist"), str):
            values["malware_blocklist"] = Path(values["malware_blocklist"]) if values["malware_blocklist"] else None
        values["extra_qtypes"] = frozenset(values.get("extra_qtypes", ()))
        return cls(**values)
