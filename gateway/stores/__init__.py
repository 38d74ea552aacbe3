"""Policy stores: embedded (a local file, the default) and Redis (shared, live)."""

from __future__ import annotations

from gateway.state import PolicyContext
from gateway.stores.base import PolicyStore
from gateway.stores.config import StoreConfig


def open_store(context: PolicyContext, config: StoreConfig) -> PolicyStore:
    """The store the `[store]` section asks for (not yet started)."""
    if config.backend == "redis":
        from gateway.stores.redis_store import RedisStore

        return RedisStore(context, config)
    from gateway.stores.embedded import EmbeddedStore

    return EmbeddedStore(context, config)
