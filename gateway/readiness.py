"""Reader callbacks that stay woken on every event loop `gateway run` can use.

uvloop (libuv's `uv_poll`) reports an error event on a descriptor (EPOLLERR: a TCP reset, an ICMP error on
a socket that reports them) by calling the reader once and then no longer polling that descriptor, where
the stdlib loop (level-triggered) calls it again for as long as there is something to read. So a reader
returns only once its source would block (or it removed itself); one that stops early, to let other work
run or after an error it consumed, re-arms: removed and added again, the descriptor is polled afresh and,
if still readable, fires at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def rearm_reader(loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[..., Any], *args: Any) -> None:
    """The reader on `fd` returned before `fd` would block: have it polled afresh."""
    loop.remove_reader(fd)
    loop.add_reader(fd, callback, *args)
