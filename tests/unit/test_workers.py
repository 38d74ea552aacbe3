"""The pure parts of `--workers`: which worker serves a sandbox, the learned-address lines between processes, and
worker k's configuration."""

from __future__ import annotations

import zlib
from dataclasses import replace

from gateway.latency import Histogram, observe
from gateway.learned import LearnedDestinations
from gateway.service import worker_config
from gateway.settings import load_config
from gateway.workers import (
    LISTENING_LINE,
    EngineCounters,
    LearnedFanout,
    WorkerPool,
    apply_learned_line,
    counters_line,
    parse_counters_line,
    worker_index,
)


def test_worker_index_is_stable_and_spreads() -> None:
    assert worker_index("alpha", 2) == zlib.crc32(b"alpha") % 2 == 0
    assert worker_index("beta", 2) == 1
    assert all(worker_index(f"sb-{i}", 1) == 0 for i in range(50))
    assert {worker_index(f"sb-{i}", 4) for i in range(200)} == {0, 1, 2, 3}


def test_learned_addresses_stay_local_or_travel_to_the_sandbox_worker_and_apply_there() -> None:
    sent: list[tuple[int, bytes]] = []
    fanout = LearnedFanout(2, lambda worker, line: sent.append((worker, line)))
    fanout.add("alpha", "git.example", ["192.0.2.7"], 60)  # worker 0: this process
    fanout.add("beta", "git.example", ["192.0.2.8", "2001:db8::8"], 60)
    fanout.add("beta", "gone.example", ["192.0.2.9"], 0)  # expired already: nothing to send
    assert fanout.lookup("alpha", "192.0.2.7") == "git.example"
    assert fanout.lookup("beta", "192.0.2.8") is None
    [(worker, line)] = sent
    assert worker == 1 and line.endswith(b"\n")
    remote = LearnedDestinations()
    assert apply_learned_line(remote, line)
    assert remote.lookup("beta", "2001:db8::8") == "git.example"
    assert remote.lookup("alpha", "192.0.2.7") is None


def test_a_bad_line_changes_nothing() -> None:
    remote = LearnedDestinations()
    for line in (b"", b"not json\n", b'{"a": 1}\n', b'[1, "n", [], 5]\n', b'["sb", "n", ["192.0.2.1"], "x"]\n'):
        assert not apply_learned_line(remote, line)
    assert len(remote) == 0


def test_worker_k_gets_its_own_egress_port_and_otherwise_the_same_configuration() -> None:
    config = load_config(None, environ={})
    mine = worker_config(config, 3)
    assert mine.egress.listen_port == config.egress.listen_port + 3
    assert replace(mine, egress=config.egress) == config
    assert worker_config(config, 0) == config


def sample_counters() -> EngineCounters:
    decisions: dict[tuple[str, str], Histogram] = {}
    dials: dict[str, Histogram] = {}
    observe(decisions, ("tls", "allow"), 0.0004)
    observe(decisions, ("http", "deny"), 0.03)
    observe(dials, "ok", 0.001)
    return EngineCounters(
        {("tls", "allow", "allow_hosts a.test"): 3, ("http", "deny", "default:deny"): 1},
        10,
        20,
        2,
        decisions,
        dials,
        flow_records_dropped=5,
    )


def test_a_counters_line_round_trips_and_sums() -> None:
    sent = sample_counters()
    got = parse_counters_line(counters_line(sent))
    assert got == sent
    total = EngineCounters()
    total.add(sent)
    total.add(sent)
    assert total.connections == {("tls", "allow", "allow_hosts a.test"): 6, ("http", "deny", "default:deny"): 2}
    assert (total.bytes_up, total.bytes_down, total.relaying, total.flow_records_dropped) == (20, 40, 4, 10)
    assert total.decisions[("tls", "allow")].count == 2 and total.dials["ok"].sum == 0.002
    assert sent == sample_counters()  # summing copied, never aliased, the source's histograms


def test_the_pool_sums_its_workers_and_keeps_an_exited_workers_counts() -> None:
    pool = WorkerPool(3, lambda k: ["true"], lambda record, line: None)
    pool.counters[1] = sample_counters()
    pool.counters[2] = sample_counters()
    pool.retired.add(sample_counters())  # a process of worker 1 that exited earlier
    total = pool.totals()
    assert total.flow_records_dropped == 15 and total.decisions[("http", "deny")].count == 3
    assert total.dials["ok"].count == 3 and total.connections[("tls", "allow", "allow_hosts a.test")] == 9
    assert pool.totals() == total  # reading the sums changes nothing


def test_other_lines_are_not_counters() -> None:
    good = counters_line(sample_counters())
    short_histogram = good.replace(b"[0,0,1,", b"[0,1,", 1)
    assert short_histogram != good
    for line in (
        LISTENING_LINE,
        b"counters {",
        b"counters {}\n",
        b'counters {"connections": [[1]]}\n',
        b"",
        short_histogram,
        good.replace(b',"flow_records_dropped":5', b""),
    ):
        assert parse_counters_line(line) is None
