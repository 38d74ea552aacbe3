"""Latency histograms of plain ints (gateway.latency) and their exposition (gateway.metrics)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.latency import BOUNDS, Histogram, add_all, observe
from gateway.metrics import Snapshot, registry_for, render


def test_a_value_counts_in_the_first_bucket_whose_bound_it_does_not_exceed() -> None:
    h = Histogram()
    h.observe(0.0)
    h.observe(BOUNDS[0])  # exactly on a bound: `le` includes it
    h.observe(0.0003)
    h.observe(BOUNDS[-1] + 1)  # above every bound: +Inf only
    assert h.counts[0] == 2 and h.counts[BOUNDS.index(0.0005)] == 1 and h.counts[-1] == 1
    assert h.count == 4 and h.sum == pytest.approx(BOUNDS[0] + 0.0003 + BOUNDS[-1] + 1)
    cumulative = dict(h.cumulative())
    assert cumulative["0.0001"] == 2 and cumulative["0.00025"] == 2 and cumulative["0.0005"] == 3
    assert cumulative["10.0"] == 3 and cumulative["+Inf"] == 4 and len(cumulative) == len(BOUNDS) + 1


def test_histograms_sum_bucket_by_bucket_and_never_share_state_with_their_source() -> None:
    mine: dict[str, Histogram] = {}
    theirs: dict[str, Histogram] = {}
    observe(theirs, "ok", 0.002)
    observe(theirs, "ok", 0.002)
    observe(theirs, "failed", 3.0)
    add_all(mine, theirs)
    add_all(mine, theirs)
    assert mine["ok"].count == 4 and mine["failed"].counts[BOUNDS.index(5.0)] == 2
    assert theirs["ok"].count == 2  # the source is unchanged
    observe(theirs, "ok", 0.002)
    assert mine["ok"].count == 4


def test_a_histogram_has_exactly_one_count_per_bucket() -> None:
    with pytest.raises(ValueError, match="buckets"):
        Histogram([1, 2, 3])


def test_the_scrape_has_cumulative_buckets_sum_count_and_the_dns_labels() -> None:
    decisions: dict[tuple[str, str], Histogram] = {}
    observe(decisions, ("tls", "allow"), 0.0004)
    observe(decisions, ("tls", "allow"), 0.02)
    snap = Snapshot(
        store_ready=True,
        store_rejected=0,
        sandboxes=1,
        flow_records_written=0,
        flow_records_dropped=0,
        store_sync_lag=0.5,
        connections={},
        decisions=decisions,
        dials={"failed": Histogram()},
        dns_queries={("BLOCKED_POLICY", "NXDOMAIN", "deny"): 3},
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(render(registry_for(lambda: snap)).decode())
        for s in family.samples
    }
    tls = (("protocol", "tls"), ("verdict", "allow"))
    assert samples[("gateway_egress_decision_seconds_bucket", (("le", "0.00025"), *tls))] == 0
    assert samples[("gateway_egress_decision_seconds_bucket", (("le", "0.0005"), *tls))] == 1
    assert samples[("gateway_egress_decision_seconds_bucket", (("le", "+Inf"), *tls))] == 2
    assert samples[("gateway_egress_decision_seconds_count", tls)] == 2
    assert samples[("gateway_egress_decision_seconds_sum", tls)] == pytest.approx(0.0204)
    assert samples[("gateway_egress_dial_seconds_count", (("outcome", "failed"),))] == 0
    dns = (("code", "BLOCKED_POLICY"), ("rcode", "NXDOMAIN"), ("verdict", "deny"))
    assert samples[("gateway_dns_queries_total", dns)] == 3
    assert samples[("gateway_store_sync_lag_seconds", ())] == 0.5
