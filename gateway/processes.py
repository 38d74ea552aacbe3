"""Child processes the gateway supervises (egress workers, the inspection tier): the one way they are ended, and
the one way their message lines are read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


async def wait_or_kill(process: asyncio.subprocess.Process, timeout: float) -> None:
    """Wait up to `timeout` for a process asked to stop, then SIGKILL it; returns once it is gone."""
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def read_lines(reader: asyncio.StreamReader, line: Callable[[bytes], None], bad: Callable[[str], None]) -> None:
    """Every line of a child's pipe to `line` (with its newline) until the pipe closes. A line longer than the
    reader's limit, or cut short by the child's death, goes to `bad` (why) and is skipped: a child never stops
    this reader with garbage. An exception `line` raises is its own bug and ends the reading."""
    while True:
        try:
            data = await reader.readline()
        except ValueError:  # longer than the reader's limit: dropped, the next one is read
            bad("longer than the limit")
            continue
        if not data:
            return
        if not data.endswith(b"\n"):  # the process died in the middle of a line
            bad("cut short")
            return
        line(data)
