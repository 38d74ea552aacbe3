"""Policy stores: embedded (a local file, the default) and Redis (shared, live)."""

from __future__ import annotations

from gateway.state import PolicyContext
from gateway.stores.base import PolicyStore
from gateway.stores.config import StoreConfig


def open_store(context: PolicyContext, config: StoreConfig, *, keeps_history: bool = True) -> PolicyStore:
    """The store the `[store]` section asks for (not yet started). `keeps_history`: False for an egress worker's
    store, which follows the main process's and must not write the revision history it keeps."""
    if config.backend == "redis":
        from gateway.stores.redis_store import RedisStore

        return RedisStore(context, config, keeps_history=keeps_history)
    from gateway.stores.embedded import EmbeddedStore

    return EmbeddedStore(context, config, keeps_history=keeps_history)
