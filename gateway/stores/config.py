"""The policy store's options: the `[store]` section (which backend, and each backend's knobs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from gateway.config import OptionError, Section


def _check_redis_url(url: str) -> None:
    """What the Redis client would refuse when `gateway run` connects, refused now. The URL is not repeated:
    it may hold a password."""
    from redis.asyncio.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        reason = f"not a Redis URL: {exc}; use redis://host:port/db, rediss://host:port/db or unix:///path"
        raise OptionError("redis_url", reason) from None


class StoreConfig(Section, frozen=True):
    """Where sandbox and template records live."""

    backend: Annotated[
        Literal["auto", "embedded", "redis"],
        Meta(description="auto: redis when redis_url is set, else embedded (a local JSON file)."),
    ] = "auto"
    path: Annotated[Path, Meta(description="Embedded store: the policy file.")] = Path("var/policies.json")
    poll_interval: Annotated[
        float, Meta(ge=0.05, le=60, description="Embedded store: how often the file is checked for edits (seconds).")
    ] = 0.5
    redis_url: Annotated[str, Meta(description="Redis store: the connection (redis://host:port/db).")] = ""
    redis_prefix: Annotated[str, Meta(description="Redis store: the key prefix.")] = "gw:"
    stream_maxlen: Annotated[
        int, Meta(ge=100, le=10_000_000, description="Redis store: the change stream's length cap.")
    ] = 100_000
    resync_interval: Annotated[
        float, Meta(ge=1, le=86_400, description="Redis store: seconds between full resyncs.")
    ] = 60.0
    node_id: Annotated[
        str, Meta(description="This node's name in the change stream and status keys (empty: the host name).")
    ] = ""

    def __post_init__(self) -> None:
        backend = self.backend
        if backend == "auto":
            backend = "redis" if self.redis_url else "embedded"
        if backend == "redis" and not self.redis_url:
            raise OptionError("redis_url", "the redis backend needs store.redis_url (redis://host:port/db)")
        if self.redis_url:
            _check_redis_url(self.redis_url)
        msgspec.structs.force_setattr(self, "backend", backend)
        msgspec.structs.force_setattr(self, "node_id", self.node_id or os.uname().nodename)
