"""The tunnel store and server beside a policy store, as `gateway run` builds them.

Build it before the control API (the API takes `service.store`), start it after the policy store has loaded,
close it before the policy store. The tunnel store uses the policy store's backend: the same Redis (same key
prefix) or a tunnels.json next to the policy file. It is handed its `[tunnel]` section and the policy store's
location, never the whole configuration.
"""

from __future__ import annotations

from pathlib import Path

from gateway.flowlog import FlowLog
from gateway.stores.base import PolicyStore
from gateway.tunnel.certs import ReloadingTLS
from gateway.tunnel.config import TunnelConfig
from gateway.tunnel.server import TunnelServer
from gateway.tunnel.store import open_tunnel_store


class TunnelService:
    def __init__(
        self,
        policy: PolicyStore,
        config: TunnelConfig,
        *,
        policy_path: Path,
        redis_url: str = "",
        redis_prefix: str = "",
        flows: FlowLog | None = None,
    ) -> None:
        self.config = config
        self.store = open_tunnel_store(
            policy.state,
            config,
            backend=policy.backend,
            policy_path=policy_path,
            redis_url=redis_url,
            prefix=redis_prefix,
        )
        # Loaded now, so a missing certificate stops start-up with CERT_INVALID (run `gateway certs init`).
        self.server = TunnelServer(self.store, config, tls=ReloadingTLS(config.cert_path, config.key_path), flows=flows)

    async def start(self) -> None:
        await self.store.start()
        await self.server.start()

    async def close(self) -> None:
        await self.server.close()
        await self.store.close()
