"""GET /metrics end to end: the real `gateway run --data-plane --steer`, real curl and dig from a sandbox, the
scrape parsed by prometheus-client's own parser; and the Grafana dashboard's expressions against that scrape."""

from __future__ import annotations

from typing import Any

import pytest

from tests.factory import (  # noqa: F401  (egress_env: the fixture `env`)
    EgressEnv,
    Samples,
    dashboard_metrics,
    delta,
    egress_env,
    pin,
    scrape,
    wait_until,
)


def family_total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a family's samples whose labels include `labels`."""
    return sum(v for (n, got), v in samples.items() if n == name and set(labels.items()) <= set(got))


def histogram_delta(before: Samples, after: Samples, name: str, **labels: str) -> tuple[float, float, float]:
    """How a histogram series moved: (_count, _sum, its +Inf bucket)."""
    return (
        delta(before, after, f"{name}_count", **labels),
        delta(before, after, f"{name}_sum", **labels),
        delta(before, after, f"{name}_bucket", le="+Inf", **labels),
    )


@pytest.mark.root
def test_connections_bytes_and_dns_queries_move_by_exactly_what_the_sandbox_did(env: EgressEnv) -> None:
    _, before = scrape(env)
    flows_before = len(env.log_events("flow"))
    ok = env.curl("sb1", "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1"))
    assert ok.stdout.startswith("ORIGIN 198.18.1.1"), ok.stderr
    denied = env.curl("sb1", "https://denied.test/", *pin("denied.test", 443, "198.18.1.2"))
    assert denied.returncode != 0
    http_denied = env.curl("sb1", "http://denied.test/", *pin("denied.test", 80, "198.18.1.2"))
    assert http_denied.stdout.startswith("403") or "host not in allowlist" in http_denied.stdout
    # Allowed, but nothing listens on the origin's port 8080: the dial fails (502).
    refused = env.curl("sb1", "http://allowed.test:8080/", *pin("allowed.test", 8080, "198.18.1.1"))
    assert refused.stdout.startswith("502") or "unreachable" in refused.stdout, refused
    assert env.dig("sb1", "@198.18.1.2", "allowed.test", "A", "+short").split() == ["198.18.1.1"]
    assert "status: NXDOMAIN" in env.dig("sb1", "@198.18.1.2", "denied.test", "A")

    def new_flows() -> list[dict[str, Any]]:
        flows = [f for f in env.log_events("flow")[flows_before:] if f["protocol"] != "dns"]
        return flows if len(flows) >= 4 else []

    flows = wait_until(new_flows)
    assert len(flows) == 4, flows
    _, after = scrape(env)
    for f in flows:
        labels = {"protocol": f["protocol"], "verdict": f["verdict"], "rule": f["rule"]}
        expected = sum(1 for g in flows if (g["protocol"], g["verdict"], g["rule"]) == tuple(labels.values()))
        assert delta(before, after, "gateway_egress_connections_total", **labels) == expected, (labels, after)
    allowed = [f for f in flows if f["verdict"] == "allow"]
    assert len(allowed) == 1 and allowed[0]["protocol"] == "tls"
    assert [f["rule"] for f in flows if f["protocol"] == "http" and f["rule"] != "default:deny"] == ["builtin:dial"]
    assert delta(before, after, "gateway_egress_connections_total", protocol="tls", verdict="deny",
                 rule="default:deny") == 1  # fmt: skip
    assert delta(before, after, "gateway_egress_connections_total", protocol="http", verdict="deny",
                 rule="default:deny") == 1  # fmt: skip
    total = family_total(after, "gateway_egress_connections_total") - family_total(
        before, "gateway_egress_connections_total"
    )
    assert total == 4
    # One verdict each: the failed dial's connection was decided allow (the dial came after), not timed twice.
    decision = "gateway_egress_decision_seconds"
    for labels, n in ((("tls", "allow"), 1), (("tls", "deny"), 1), (("http", "deny"), 1), (("http", "allow"), 1)):
        count, seconds, inf = histogram_delta(before, after, decision, protocol=labels[0], verdict=labels[1])
        assert count == inf == n and 0 < seconds < 10 * n, (labels, count, seconds, inf)
    assert family_total(after, f"{decision}_count") - family_total(before, f"{decision}_count") == 4
    for outcome in ("ok", "failed"):
        count, seconds, inf = histogram_delta(before, after, "gateway_egress_dial_seconds", outcome=outcome)
        assert count == inf == 1 and 0 < seconds < 3, (outcome, count, seconds)
    up, down = sum(f["bytes_up"] for f in flows), sum(f["bytes_down"] for f in flows)
    assert down > 0
    assert delta(before, after, "gateway_egress_bytes_total", direction="up") == up
    assert delta(before, after, "gateway_egress_bytes_total", direction="down") == down
    dns = family_total(after, "gateway_dns_queries_total") - family_total(before, "gateway_dns_queries_total")
    assert dns == 2, after
    answered = family_total(after, "gateway_dns_queries_total", rcode="NOERROR", verdict="allow")
    assert answered - family_total(before, "gateway_dns_queries_total", rcode="NOERROR", verdict="allow") == 1
    blocked = {"code": "BLOCKED_POLICY", "rcode": "NXDOMAIN", "verdict": "deny"}
    assert delta(before, after, "gateway_dns_queries_total", **blocked) == 1
    assert delta(before, after, "gateway_flow_records_dropped_total") == 0
    assert after[("gateway_store_sync_lag_seconds", ())] == 0  # the embedded store
    assert after[("gateway_egress_active_connections", ())] == 0
    assert after[("gateway_store_ready", ())] == 1
    assert after[("gateway_sandboxes", ())] == 4
    assert after[("gateway_inspection_up", ())] == 0  # no policy marks a host: the tier is not started


@pytest.mark.root
def test_every_metric_the_grafana_dashboard_queries_is_in_a_real_scrape(env: EgressEnv) -> None:
    # A denied and an allowed connection (a dial), so that the labelled families have samples.
    env.curl("sb1", "https://denied.test/", *pin("denied.test", 443, "198.18.1.2"))
    assert env.curl("sb1", "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1")).returncode == 0
    assert env.dig("sb1", "@198.18.1.2", "allowed.test", "A", "+short")
    denial = ("gateway_egress_connections_total", (("protocol", "tls"), ("rule", "default:deny"), ("verdict", "deny")))
    samples = wait_until(lambda: (got := scrape(env)[1]) and denial in got and got)
    exported = {name for name, _ in samples}
    # The tunnel's families are checked against a scrape of a gateway that serves tunnels (test_tunnel_product).
    used = {name for name in dashboard_metrics() if not name.startswith("gateway_tunnel_")}
    assert used and used <= exported, used - exported
