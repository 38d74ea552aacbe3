"""Prometheus metrics: what `GET /metrics` answers.

The components keep plain int counters (the engine's recorder and its latency histograms, `gateway.latency`; the
DNS interceptor's counts, the flow log, the tier supervisor, the worker pool); nothing on the per-connection path
calls prometheus-client. At scrape time
`service.py` gathers them into one `Snapshot`, and `families` (pure) turns it into metric families, which a
`SnapshotCollector` in a registry of the gateway's own (not the process-global one) hands to the exposition
format.

Names follow the Prometheus conventions: counters end in `_total`, units are base units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.latency import Histogram

__all__ = ["CONTENT_TYPE", "Snapshot", "SnapshotCollector", "TierSnapshot", "families", "registry_for", "render"]

#: The text exposition format's media type, as prometheus-client renders it.
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST


@dataclass(frozen=True, slots=True)
class TierSnapshot:
    """The inspection tier's supervisor, as it is now."""

    up: bool
    restarts: int
    bad_records: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every counter the gateway exports, read at one moment. Data-plane parts are None without the data plane."""

    store_ready: bool
    store_rejected: int
    sandboxes: int
    flow_records_written: int
    flow_records_dropped: int
    #: Seconds the loaded policies may be behind the store's source (`PolicyStore.sync_lag`).
    store_sync_lag: float = 0.0
    #: Egress connections recorded, by (protocol, verdict, rule).
    connections: Mapping[tuple[str, str, str], int] | None = None
    #: Accept-to-verdict latency, by (protocol, verdict); upstream connect latency, by outcome (ok, failed).
    decisions: Mapping[tuple[str, str], Histogram] | None = None
    dials: Mapping[str, Histogram] | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    relaying: int = 0
    #: DNS queries, by (the interceptor's code, the answer's rcode or DROPPED, verdict).
    dns_queries: Mapping[tuple[str, str, str], int] | None = None
    tier: TierSnapshot | None = None
    worker_restarts: int | None = None
    #: Tunnel requests answered, by the status the client got (0: none was sent); None without the tunnel.
    tunnel_requests: Mapping[int, int] | None = None
    #: Tunnel password checks, by result (ok, failed, throttled).
    tunnel_logins: Mapping[str, int] | None = None


def families(snap: Snapshot) -> list[Metric]:
    """The metric families of `snap`, in a fixed order."""
    out: list[Metric] = []
    out.append(GaugeMetricFamily("gateway_store_ready", "1 once the policy store has loaded.", int(snap.store_ready)))
    out.append(
        GaugeMetricFamily(
            "gateway_store_rejected_records",
            "Records in the store that failed validation and are ignored (the last good version stays).",
            snap.store_rejected,
        )
    )
    out.append(
        GaugeMetricFamily(
            "gateway_store_sync_lag_seconds",
            "Seconds since the policy store last confirmed it holds every change of its source (0: embedded).",
            snap.store_sync_lag,
        )
    )
    out.append(GaugeMetricFamily("gateway_sandboxes", "Sandboxes in the policy store.", snap.sandboxes))
    out.append(
        CounterMetricFamily(
            "gateway_flow_records_written", "Flow records written to audit batches.", snap.flow_records_written
        )
    )
    out.append(
        CounterMetricFamily(
            "gateway_flow_records_dropped",
            "Flow records not written to audit batches because the queue was full.",
            snap.flow_records_dropped,
        )
    )
    if snap.connections is not None:
        conns = CounterMetricFamily(
            "gateway_egress_connections",
            "Egress connections decided and ended, by protocol, verdict and rule.",
            labels=("protocol", "verdict", "rule"),
        )
        for (protocol, verdict, rule), count in sorted(snap.connections.items()):
            conns.add_metric((protocol, verdict, rule), count)
        out.append(conns)
        moved = CounterMetricFamily(
            "gateway_egress_bytes", "Bytes relayed for ended egress connections, by direction.", labels=("direction",)
        )
        moved.add_metric(("up",), snap.bytes_up)
        moved.add_metric(("down",), snap.bytes_down)
        out.append(moved)
        active = GaugeMetricFamily("gateway_egress_active_connections", "Egress connections being relayed now.")
        active.add_metric((), snap.relaying)
        out.append(active)
    if snap.decisions is not None:
        out.append(
            histogram_family(
                "gateway_egress_decision_seconds",
                "Seconds from accepting an egress connection to its verdict (peek, limits, resolution, policy).",
                ("protocol", "verdict"),
                snap.decisions,
            )
        )
    if snap.dials is not None:
        dials = {(outcome,): histogram for outcome, histogram in snap.dials.items()}
        out.append(
            histogram_family(
                "gateway_egress_dial_seconds", "Seconds the upstream connect took, by outcome.", ("outcome",), dials
            )
        )
    if snap.dns_queries is not None:
        dns = CounterMetricFamily(
            "gateway_dns_queries",
            "DNS queries, by the interceptor's code, the answer's rcode (DROPPED: none sent) and verdict.",
            labels=("code", "rcode", "verdict"),
        )
        for key, count in sorted(snap.dns_queries.items()):
            dns.add_metric(key, count)
        out.append(dns)
    if snap.tier is not None:
        out.append(GaugeMetricFamily("gateway_inspection_up", "1 while the inspection tier serves.", int(snap.tier.up)))
        out.append(
            CounterMetricFamily(
                "gateway_inspection_restarts", "Times the inspection tier was restarted.", snap.tier.restarts
            )
        )
        out.append(
            CounterMetricFamily(
                "gateway_inspection_bad_records",
                "Lines from the inspection tier that were not valid flow records.",
                snap.tier.bad_records,
            )
        )
    if snap.worker_restarts is not None:
        out.append(
            CounterMetricFamily(
                "gateway_worker_restarts", "Egress worker processes restarted after exiting.", snap.worker_restarts
            )
        )
    if snap.tunnel_requests is not None:
        answered = CounterMetricFamily(
            "gateway_tunnel_requests",
            "Tunnel requests answered, by the HTTP status the client got (the app's or the gateway's own).",
            labels=("status",),
        )
        for status, count in sorted(snap.tunnel_requests.items()):
            answered.add_metric((str(status),), count)
        out.append(answered)
    if snap.tunnel_logins is not None:
        logins = CounterMetricFamily(
            "gateway_tunnel_logins", "Tunnel password checks, by result (ok, failed, throttled).", labels=("result",)
        )
        for result, count in sorted(snap.tunnel_logins.items()):
            logins.add_metric((result,), count)
        out.append(logins)
    return out


def histogram_family[K: tuple[str, ...]](
    name: str, documentation: str, labels: tuple[str, ...], histograms: Mapping[K, Histogram]
) -> HistogramMetricFamily:
    """A histogram family, one series per label values (`histograms`' keys, in `labels`' order)."""
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, histogram in sorted(histograms.items()):
        family.add_metric(key, histogram.cumulative(), histogram.sum)
    return family


class SnapshotCollector(Collector):
    """Reads a fresh `Snapshot` on every scrape."""

    def __init__(self, read: Callable[[], Snapshot]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        return families(self.read())


def registry_for(read: Callable[[], Snapshot]) -> CollectorRegistry:
    """A registry of the gateway's own (no process or platform collectors, nothing global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(read))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the text exposition format."""
    return generate_latest(registry)
