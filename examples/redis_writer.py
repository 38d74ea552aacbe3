"""Write sandbox policies straight to Redis, as another service would (README "The Redis contract",
docs/redis-contract.md): the hash and the change entry in one MULTI/EXEC.

    python examples/redis_writer.py --redis-url redis://127.0.0.1:6379/0 examples/policies/ai-agent.json
    python examples/redis_writer.py --redis-url redis://127.0.0.1:6379/0 --delete agent-42

Every gateway node on that Redis applies the change within its poll; a record it refuses is listed in
`GET /v1/status` and `gw:status:rejected`, and its last good version stays in force.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import redis

STREAM_MAXLEN = 100_000  # the gateway's store.stream_maxlen default


def change(client: redis.Redis, prefix: str, key: str, record: dict[str, Any] | None, source: str) -> None:
    """Put (`record`) or delete (None) sandbox `key`, with its change entry, in one transaction."""
    with client.pipeline(transaction=True) as tx:
        if record is None:
            tx.hdel(prefix + "sandboxes", key)
        else:
            tx.hset(prefix + "sandboxes", key, json.dumps(record))
        entry = {"kind": "sandbox", "key": key, "op": "delete" if record is None else "put", "source": source}
        tx.xadd(prefix + "changes", entry, maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
        tx.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", required=True, help="the gateway's store.redis_url")
    parser.add_argument("--prefix", default="gw:", help="the gateway's store.redis_prefix")
    parser.add_argument("--source", default="redis-writer-example", help="who wrote it (kept in the entry)")
    parser.add_argument("--delete", metavar="ID", action="append", default=[], help="delete this sandbox")
    parser.add_argument("records", nargs="*", type=Path, help="sandbox records (JSON files)")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    for path in args.records:
        record = json.loads(path.read_text())
        change(client, args.prefix, record["id"], record, args.source)
        print(f"put {record['id']}")
    for sandbox_id in args.delete:
        change(client, args.prefix, sandbox_id, None, args.source)
        print(f"deleted {sandbox_id}")


if __name__ == "__main__":
    main()
