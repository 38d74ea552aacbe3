"""The flow records' options: the `[audit]` section, apart so that the flow log can read it without the whole
configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from msgspec import Meta

from gateway.config import Section


class AuditConfig(Section, frozen=True):
    """Flow records as NDJSON batches {ts_us}-{pid}.ndjson under dir/<sandbox id>/."""

    dir: Annotated[Path, Meta(description="Where the batches are written.")] = Path("var/audit")
    flush_interval: Annotated[float, Meta(ge=0.05, le=3600, description="Seconds between batch writes.")] = 1.0
    redis_stream: Annotated[
        str,
        Meta(
            description="Optionally mirror every flow record to this Redis stream (store.redis_url), capped in length."
        ),
    ] = ""
    redis_maxlen: Annotated[int, Meta(ge=100, le=100_000_000, description="The mirror stream's length cap.")] = 100_000
