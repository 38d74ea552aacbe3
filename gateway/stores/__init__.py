"""Policy stores: embedded (a local file, the default) and Redis (shared, live)."""

from __future__ import annotations

from gateway.config import Config
from gateway.stores.base import PolicyStore


def open_store(config: Config) -> PolicyStore:
    """The store the configuration asks for (not yet started)."""
    if config.store.backend == "redis":
        from gateway.stores.redis_store import RedisStore

        return RedisStore(config.policy_context(), config.store)
    from gateway.stores.embedded import EmbeddedStore

    return EmbeddedStore(config.policy_context(), config.store.path, config.store.poll_interval)
