"""A platform's side of the gateway, through its public Python client (`gateway.client.ApiClient`): create
a sandbox, ask what it may reach, open a tunnel to one of its ports, revoke it, delete the sandbox.

    GATEWAY_API_URL=http://127.0.0.1:8470 GATEWAY_TOKEN=... python examples/platform_client.py

Wiring the sandbox's network to the gateway (`gateway sandbox attach`) is a local, root step on the gateway
host, not an API call: a VMM or the platform's node agent runs it (or names its interface) when it starts
the sandbox. Every call raises `ApiError` (a stable `code`, a message, a field) when the API refuses it.
"""

from __future__ import annotations

import os
import secrets

from gateway.client import ApiClient, ApiError

SANDBOX = {
    "id": "agent-42",
    "addresses": ["10.75.0.42"],
    "profile": "allowlisted",
    "egress": {"allow_hosts": ["api.example.com"], "host_ports": [443]},
    "ingress": {"ports": [8080]},
    "labels": {"tenant": "acme"},
}


def main() -> None:
    client = ApiClient(os.environ.get("GATEWAY_API_URL", "http://127.0.0.1:8470"), os.environ.get("GATEWAY_TOKEN"))
    sandbox_id = str(SANDBOX["id"])
    created = client.create_sandbox(SANDBOX).data
    print(f"created {created['id']} ({created['profile']})")
    try:
        for host in ("api.example.com:443", "evil.example.net:443"):
            verdict = client.explain(sandbox_id, host=host).data
            print(f"explain {host}: {'ALLOW' if verdict['allowed'] else 'DENY'} ({verdict['reason']})")
        password = secrets.token_urlsafe(16)  # handed to the user; the gateway keeps only its hash
        tunnel = client.expose_tunnel(sandbox_id, {"port": 8080, "label": "web app", "password": password}).data
        print(f"tunnel {tunnel['id']} at {tunnel['url']}")
        client.revoke_tunnel(tunnel["id"])
        print(f"revoked {tunnel['id']}")
    except ApiError as exc:
        print(f"refused: {exc.describe()}")
        raise
    finally:
        client.delete_sandbox(sandbox_id)
        print(f"deleted {sandbox_id}")


if __name__ == "__main__":
    main()
