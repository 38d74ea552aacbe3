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
    log_records: Annotated[
        bool,
        Meta(
            description="Also write every flow record to the log as an info event `flow` (off: records are records, "
            "read them from the batches, the Redis stream or `gateway audit tail`)."
        ),
    ] = False
    max_stream_subscribers: Annotated[
        int, Meta(ge=1, le=1000, description="Live flow views (GET /v1/flows/stream) served at once.")
    ] = 16
