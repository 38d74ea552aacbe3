"""The whole configuration: every component's section, read from one file and the environment.

Part of the composition: it imports each component's section model (and nothing else of the components), so
that gateway/config.py, the machinery, knows none of them. The composition root hands each component its own
section (`config.egress`, `config.dns`, ...); `SECTIONS` is also what gateway/configdoc.py renders.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.api_config import ApiConfig, ApiToken
from gateway.audit_config import AuditConfig
from gateway.config import (
    LimitsConfig,
    LogConfig,
    NetworkConfig,
    Section,
    build_section,
    invalid,
    parse_presets,
    read_sources,
)
from gateway.dns.config import DnsConfig
from gateway.engine.config import EgressConfig
from gateway.policy import IPNetwork, Limits
from gateway.presets import Preset
from gateway.resolver import ResolverConfig
from gateway.state import PolicyContext
from gateway.stores.config import StoreConfig
from gateway.tier.config import InspectionConfig
from gateway.tunnel.config import TunnelConfig

#: Every section in the order the example file shows them; None: free-form tables ([presets.NAME]).
SECTIONS: Mapping[str, type[Section] | None] = {
    "network": NetworkConfig,
    "store": StoreConfig,
    "api": ApiConfig,
    "limits": LimitsConfig,
    "log": LogConfig,
    "presets": None,
    "egress": EgressConfig,
    "resolver": ResolverConfig,
    "dns": DnsConfig,
    "tunnel": TunnelConfig,
    "audit": AuditConfig,
    "inspection": InspectionConfig,
}


@dataclass(frozen=True, slots=True)
class Config:
    sandbox_subnets: tuple[IPNetwork, ...]
    store: StoreConfig
    api_host: str
    api_port: int
    tokens: tuple[ApiToken, ...]
    default_limits: Limits
    log_format: str
    log_level: str
    egress: EgressConfig
    resolver: ResolverConfig
    dns: DnsConfig
    tunnel: TunnelConfig
    audit: AuditConfig
    inspection: InspectionConfig
    presets: Mapping[str, Preset] = field(default_factory=dict)
    source: str = "defaults"

    def policy_context(self) -> PolicyContext:
        return PolicyContext(
            self.sandbox_subnets, self.presets, self.default_limits, secrets=self.inspection.secret_names()
        )


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file, then environment overrides. Raises GatewayError(CONFIG_INVALID)."""
    raw, source = read_sources(SECTIONS, path, os.environ if environ is None else environ)
    network = build_section(NetworkConfig, "network", raw["network"])
    store = build_section(StoreConfig, "store", raw["store"])
    api = build_section(ApiConfig, "api", raw["api"])
    limits = build_section(LimitsConfig, "limits", raw["limits"])
    log = build_section(LogConfig, "log", raw["log"])
    presets = parse_presets(raw["presets"])
    egress = build_section(EgressConfig, "egress", raw["egress"])
    resolver = build_section(ResolverConfig, "resolver", raw["resolver"])
    dns = build_section(
        DnsConfig,
        "dns",
        raw["dns"],
        port=egress.dns_port,
        upstreams=resolver.upstreams,
        upstream_timeout=resolver.timeout,
        min_ttl=resolver.min_ttl,
        max_ttl=resolver.max_ttl,
    )
    tunnel = build_section(TunnelConfig, "tunnel", raw["tunnel"])
    audit = build_section(AuditConfig, "audit", raw["audit"])
    inspection = build_section(InspectionConfig, "inspection", raw["inspection"])
    if audit.redis_stream and not store.redis_url:
        raise invalid("the flow-record mirror writes to the Redis at store.redis_url; set it", "audit.redis_stream")
    return Config(
        sandbox_subnets=network.sandbox_subnets,
        store=store,
        api_host=api.host,
        api_port=api.port,
        tokens=api.tokens,
        default_limits=limits.limits(),
        log_format=log.format,
        log_level=log.level,
        egress=egress,
        resolver=resolver,
        dns=dns,
        tunnel=tunnel,
        audit=audit,
        inspection=inspection,
        presets=presets,
        source=source,
    )
