"""The one decision record per connection (gateway.engine.record)."""

from __future__ import annotations

import time

from gateway.engine.record import Flow, FlowRecorder
from gateway.flowlog import FlowRecord
from gateway.rules import Rule


class _Records:
    """A flow log stand-in that keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[FlowRecord] = []

    def record(self, record: FlowRecord) -> None:
        self.records.append(record)


def test_one_record_per_connection_built_from_its_facts_and_verdict() -> None:
    sink = _Records()
    recorder = FlowRecorder(sink)  # type: ignore[arg-type]
    denied = Flow(1_000, "sb1", "10.75.0.2", 40000, "198.18.1.1", 443, hostname="denied.test", protocol="tls")
    denied.deny("host not in allowlist", Rule.DEFAULT_DENY)
    recorder.record(denied)
    allowed = Flow(2_000, "sb1", "10.75.0.2", 40001, "198.18.1.9", 443, hostname="one.test", protocol="tls")
    allowed.dst_addr, allowed.dst_port = "198.18.1.1", 443
    allowed.allow("host one.test allowed by allow_hosts one.test", Rule.ALLOW_HOSTS.label("one.test"))
    allowed.bytes_up, allowed.bytes_down = 10, 20
    recorder.record(allowed)
    first, second = sink.records
    assert (first.verdict, first.rule, first.reason) == ("deny", "default:deny", "host not in allowlist")
    assert (first.dst_addr, first.dst_port) == ("198.18.1.1", 443)  # nothing dialled: the original destination
    assert first.end_us >= first.start_us == 1_000 and first.duration_ms >= 0
    assert (second.verdict, second.rule) == ("allow", "allow_hosts one.test")
    assert (second.dst_addr, second.orig_dst_addr, second.bytes_up, second.bytes_down) == (
        "198.18.1.1",
        "198.18.1.9",
        10,
        20,
    )


def test_the_verdict_latency_is_observed_by_protocol_and_verdict_and_the_dial_by_outcome() -> None:
    recorder = FlowRecorder(_Records())  # type: ignore[arg-type]
    flow = Flow(1_000, "sb1", "10.75.0.2", 40000, "198.18.1.1", 443, protocol="tls", accepted=time.perf_counter())
    flow.allow("allowed", Rule.ALLOW_HOSTS.label("one.test"))
    recorder.decided(flow)
    recorder.dialled(False, 0.003)
    assert list(recorder.decisions) == [("tls", "allow")] and recorder.decisions[("tls", "allow")].count == 1
    assert 0 <= recorder.decisions[("tls", "allow")].sum < 60
    assert list(recorder.dials) == ["failed"] and recorder.dials["failed"].sum == 0.003
    denied = Flow(2_000, "sb1", "10.75.0.2", 40001, "198.18.1.1", 80, protocol="http", accepted=time.perf_counter())
    denied.deny("host not in allowlist", Rule.DEFAULT_DENY)
    recorder.decided(denied)
    assert recorder.decisions[("http", "deny")].count == 1
