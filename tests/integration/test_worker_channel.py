"""The worker -> main channel of `--workers`, with a real child process standing in for a worker: `listening` and
`record` messages are understood, anything else (garbage, unknown kinds, a record that does not decode, a line over
the limit, a line cut short) is counted and skipped, and what a stopping worker still writes is delivered."""

from __future__ import annotations

import json
import sys

from gateway.flowlog import FlowRecord, render
from gateway.workers import MAX_MESSAGE_LINE, WorkerPool, record_lines
from tests.factory import wait_until_async

RECORD = FlowRecord(
    start_us=1, end_us=2, sandbox="beta", src_addr="10.75.0.2", src_port=40000, dst_addr="198.18.1.1",
    dst_port=443, orig_dst_addr="198.18.1.1", orig_dst_port=443, hostname="allowed.test", protocol="tls",
    bytes_up=1, bytes_down=2, duration_ms=0.5, verdict="allow", reason="allowed", rule="allow_hosts[0]",
)  # fmt: skip

#: A worker that writes `first`, says it listens, and writes `last` once its stdin closes (it is stopping).
CHILD = """
import sys, json
first, last = json.loads(sys.argv[1]).replace("LONG", "x" * int(sys.argv[3])), json.loads(sys.argv[2])
out = sys.stdout.buffer
out.write(first.encode()); out.write(b"listening\\n"); out.flush()
sys.stdin.read()
out.write(last.encode()); out.flush()
"""


async def test_the_channel_delivers_records_and_counts_garbage_without_stopping() -> None:
    good = record_lines([render(RECORD)]).decode()
    hostile = "".join(
        [
            "hello\n",  # no known kind
            "record {not json\n",
            'record {"sandbox": "beta"}\n',  # not a whole record
            "record LONG\n",  # over the limit (made long by the child)
            "\x00\xff\n",
            good,
        ]
    )
    last = record_lines([render(RECORD), render(RECORD)]).decode() + "record {cut"  # the last one cut short
    got: list[FlowRecord] = []
    pool = WorkerPool(
        2,
        lambda k: [sys.executable, "-c", CHILD, json.dumps(hostile), json.dumps(last), str(MAX_MESSAGE_LINE + 10)],
        lambda record, _rendered: got.append(record),
    )
    await pool.start()
    try:
        assert await wait_until_async(lambda: pool.listening == {1}, timeout=10)
        assert got == [RECORD]
        assert pool.bad_lines == 5
    finally:
        await pool.close()  # stdin closes: the worker writes its last records, which are read before it is reaped
    assert got == [RECORD] * 3
    assert pool.bad_lines == 6 and pool.restarts == 0
