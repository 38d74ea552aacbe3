"""The whole configuration: every component's section, read from one file and the environment.

Part of the composition: it imports each component's section model (and nothing else of the components), so
that gateway/config.py, the machinery, knows none of them. The composition root hands each component its own
section (`config.egress`, `config.dns`, ...); `SECTIONS` is also what gateway/configdoc.py renders.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec

from gateway.api_config import ApiConfig
from gateway.audit_config import AuditConfig
from gateway.config import (
    LimitsConfig,
    LogConfig,
    NetworkConfig,
    Section,
    build_section,
    invalid,
    live_options,
    option_names,
    parse_presets,
    read_sources,
)
from gateway.dns.config import DnsConfig
from gateway.engine.config import EgressConfig
from gateway.invariants import Invariants, InvariantsConfig, redis_endpoint, service_assertion
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
    "invariants": InvariantsConfig,
}


@dataclass(frozen=True, slots=True)
class Config:
    """One field per section of SECTIONS (same names), the parsed presets, and where the values came from."""

    network: NetworkConfig
    store: StoreConfig
    api: ApiConfig
    limits: LimitsConfig
    log: LogConfig
    egress: EgressConfig
    resolver: ResolverConfig
    dns: DnsConfig
    tunnel: TunnelConfig
    audit: AuditConfig
    inspection: InspectionConfig
    invariants: InvariantsConfig
    presets: Mapping[str, Preset] = field(default_factory=dict)
    source: str = "defaults"

    @property
    def sections(self) -> dict[str, Section]:
        """Each section by name, in SECTIONS' order: what a reload compares option by option."""
        return {name: getattr(self, name) for name, model in SECTIONS.items() if model is not None}

    def policy_context(self) -> PolicyContext:
        services = service_assertion(
            [
                (self.api.host, self.api.port),
                ("127.0.0.1", self.inspection.listen_port),
                *redis_endpoint(self.store.redis_url),
            ]
        )
        invariants = Invariants(
            (*([services] if services else []), *self.invariants.never_reach), self.invariants.ceilings
        )
        return PolicyContext(
            self.network.sandbox_subnets,
            self.presets,
            self.limits.limits(),
            secrets=self.inspection.secret_names(),
            invariants=invariants,
        )


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file, then environment overrides. Raises GatewayError(CONFIG_INVALID)."""
    raw, source = read_sources(SECTIONS, path, os.environ if environ is None else environ)
    egress = build_section(EgressConfig, "egress", raw["egress"])
    resolver = build_section(ResolverConfig, "resolver", raw["resolver"])
    config = Config(
        network=build_section(NetworkConfig, "network", raw["network"]),
        store=build_section(StoreConfig, "store", raw["store"]),
        api=build_section(ApiConfig, "api", raw["api"]),
        limits=build_section(LimitsConfig, "limits", raw["limits"]),
        log=build_section(LogConfig, "log", raw["log"]),
        egress=egress,
        resolver=resolver,
        dns=build_section(
            DnsConfig,
            "dns",
            raw["dns"],
            port=egress.dns_port,
            upstreams=resolver.upstreams,
            upstream_timeout=resolver.timeout,
            min_ttl=resolver.min_ttl,
            max_ttl=resolver.max_ttl,
        ),
        tunnel=build_section(TunnelConfig, "tunnel", raw["tunnel"]),
        audit=build_section(AuditConfig, "audit", raw["audit"]),
        inspection=build_section(InspectionConfig, "inspection", raw["inspection"]),
        invariants=build_section(InvariantsConfig, "invariants", raw["invariants"]),
        presets=parse_presets(raw["presets"]),
        source=source,
    )
    if config.audit.redis_stream and not config.store.redis_url:
        raise invalid("the flow-record mirror writes to the Redis at store.redis_url; set it", "audit.redis_stream")
    return config


@dataclass(frozen=True, slots=True)
class Reload:
    """What a reload (SIGHUP) does: `config` runs from now on (the running one with the new values of the live
    options), `applied` and `restart_needed` name the changed options (`section.option`) of each kind."""

    config: Config
    applied: tuple[str, ...]
    restart_needed: tuple[str, ...]


def plan_reload(running: Config, loaded: Config) -> Reload:
    """Compare a freshly loaded configuration with the running one, option by option (pure)."""
    # The operator presets are live as a whole ([presets.NAME] tables are no options): every policy is compiled again.
    applied: list[str] = ["presets"] if loaded.presets != running.presets else []
    restart: list[str] = []
    merged: dict[str, Any] = {}  # section name -> Section, as Config's keyword arguments
    for name, section in running.sections.items():
        new = loaded.sections[name]
        live = live_options(type(section))
        changed = [o for o in option_names(type(section)) if getattr(section, o) != getattr(new, o)]
        applied += [f"{name}.{o}" for o in changed if o in live]
        restart += [f"{name}.{o}" for o in changed if o not in live]
        merged[name] = msgspec.structs.replace(section, **{o: getattr(new, o) for o in changed if o in live})
    config = replace(running, source=loaded.source, presets=loaded.presets, **merged)
    return Reload(config, tuple(applied), tuple(restart))
