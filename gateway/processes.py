"""Child processes the gateway supervises (egress workers, the inspection tier): the one way they are ended."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_or_kill(process: asyncio.subprocess.Process, timeout: float) -> None:
    """Wait up to `timeout` for a process asked to stop, then SIGKILL it; returns once it is gone."""
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
