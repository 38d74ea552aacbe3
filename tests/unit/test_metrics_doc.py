"""The README's metrics table and what `gateway.metrics.families` exports: the same names, both ways."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.latency import Histogram
from gateway.metrics import Snapshot, TierSnapshot, families

README = Path(__file__).resolve().parents[2] / "README.md"


def documented() -> set[str]:
    """The names in the first column of the table under `## Metrics`."""
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `gateway_")]
    return {name for cell in rows for name in re.findall(r"`(gateway_[a-z_]+)`", cell)}


def test_every_exported_family_is_documented_and_every_documented_one_exported() -> None:
    everything = Snapshot(
        store_ready=True,
        store_rejected=0,
        sandboxes=0,
        flow_records_written=0,
        flow_records_dropped=0,
        connections={},
        decisions={("tls", "allow"): Histogram()},
        dials={"ok": Histogram()},
        dns_queries={},
        tier=TierSnapshot(True, 0, 0),
        worker_restarts=0,
        tunnel_requests={},
        tunnel_logins={},
    )
    # Counters are exposed with `_total`, as the README names them.
    exported = {f"{f.name}_total" if f.type == "counter" else f.name for f in families(everything)}
    assert exported == documented()
