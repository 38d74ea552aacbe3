"""The one egress decision record per connection (smokescreen's CANONICAL-PROXY-DECISION).

`Flow` gathers a connection's facts as the engine learns them (source, original destination, sandbox,
name, protocol, dialled address, byte counts) and its verdict; `FlowRecorder.record` turns it into the
`FlowRecord` exactly once, when the connection's fate is sealed (denied, or relayed and ended). The flow
log writes the `flow` line from it; without a flow log the record is logged as that line here. There is
no second log line per denial: the record is the log line.

The recorder also keeps the engine's running totals (connections by protocol, verdict and rule; bytes each
way; the decision and dial latency histograms of `gateway.latency`) as plain ints, read by the metrics
collector at scrape time: a dict update and a bucket increment per connection, not a prometheus-client
call on the hot path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from gateway.decision import CompiledPolicy
from gateway.flowlog import FlowLog, FlowProtocol, FlowRecord, flow_verdict, new_denial_id
from gateway.latency import Histogram, observe

log = structlog.get_logger("gateway.egress")


@dataclass(slots=True)
class Flow:
    start_us: int
    sandbox: str
    src_addr: str
    src_port: int
    orig_dst_addr: str
    orig_dst_port: int
    dst_addr: str = ""
    dst_port: int = 0
    hostname: str | None = None
    protocol: FlowProtocol = "tcp"
    bytes_up: int = 0
    bytes_down: int = 0
    allowed: bool = False
    reason: str = ""
    rule: str = ""  # the rule's label, as records show it
    would_deny: bool = False  # allowed only because the policy is in report mode
    revision: str | None = None  # of the policy that decided (None: no policy, an unknown source)
    accepted: float = 0.0  # time.perf_counter() when the connection was accepted (for the decision latency)
    policy: CompiledPolicy | None = None  # the sandbox's, once known: its operator messages for denials
    message: str = ""  # a denial's: the operator's message for its rule
    denial_id: str = ""  # a denial's: the id told the sandbox, which finds this record
    learned_name: str | None = None  # no name of its own: the one its address was learned from DNS for

    def deny(self, reason: str, rule: str) -> None:
        self.allowed, self.reason, self.rule = False, reason, rule
        self.denial_id = new_denial_id()
        self.message = self.policy.message_for(rule) if self.policy is not None else ""

    def allow(self, reason: str, rule: str, would_deny: bool = False) -> None:
        self.allowed, self.reason, self.rule, self.would_deny = True, reason, rule, would_deny


class FlowRecorder:
    """Builds the record from a `Flow` and hands it to the flow log (never raises, never blocks)."""

    __slots__ = ("bytes_down", "bytes_up", "connections", "decisions", "dials", "flowlog")

    def __init__(self, flowlog: FlowLog | None) -> None:
        self.flowlog = flowlog
        #: Recorded connections by (protocol, verdict, rule).
        self.connections: dict[tuple[str, str, str], int] = {}
        self.bytes_up = 0
        self.bytes_down = 0
        #: Seconds from the accept to the verdict (peek, limits, resolution, policy), by (protocol, verdict).
        self.decisions: dict[tuple[str, str], Histogram] = {}
        #: Seconds the upstream connect took, by outcome (ok, failed).
        self.dials: dict[str, Histogram] = {}

    def decided(self, flow: Flow) -> None:
        """The flow's verdict was given now: observe how long it took since the accept (once per connection)."""
        verdict = flow_verdict(flow.allowed, flow.would_deny)
        observe(self.decisions, (flow.protocol, verdict), time.perf_counter() - flow.accepted)

    def dialled(self, ok: bool, seconds: float) -> None:
        observe(self.dials, "ok" if ok else "failed", seconds)

    def record(self, flow: Flow) -> None:
        end_us = time.time_ns() // 1000
        record = FlowRecord(
            start_us=flow.start_us,
            end_us=end_us,
            sandbox=flow.sandbox,
            src_addr=flow.src_addr,
            src_port=flow.src_port,
            dst_addr=flow.dst_addr or flow.orig_dst_addr,
            dst_port=flow.dst_port or flow.orig_dst_port,
            orig_dst_addr=flow.orig_dst_addr,
            orig_dst_port=flow.orig_dst_port,
            hostname=flow.hostname,
            protocol=flow.protocol,
            bytes_up=flow.bytes_up,
            bytes_down=flow.bytes_down,
            duration_ms=max(0, end_us - flow.start_us) / 1000,
            verdict=flow_verdict(flow.allowed, flow.would_deny),
            reason=flow.reason,
            rule=flow.rule,
            message=flow.message or None,
            denial_id=flow.denial_id or None,
            revision=flow.revision,
            learned_name=flow.learned_name,
        )
        key = (record.protocol, record.verdict, record.rule)
        self.connections[key] = self.connections.get(key, 0) + 1
        self.bytes_up += flow.bytes_up
        self.bytes_down += flow.bytes_down
        if self.flowlog is None:
            log.info("flow", **record.to_dict())  # the flow log writes this line itself when it is there
        else:
            self.flowlog.record(record)
