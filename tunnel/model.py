"""Tunnel records: what a tunnel is, how its request is validated, how its password is kept. Pure.

A tunnel's id is also the first label of its host name, so it is random and never derived
from the sandbox id: 16 characters of lowercase base32 from `secrets` = 80 bits. Passwords
are kept as scrypt hashes (`hashlib.scrypt`, stdlib: no extra dependency and a memory-hard
KDF, which is what RFC 7914 and OWASP accept beside argon2id), each with its own salt.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Annotated, Any, Final, Literal

from gateway.errors import Forbidden, GatewayError
from gateway.policy import ADDRESS_SCHEMA, PORT_SCHEMA, Ingress, IPAddress
from gateway.schema import Note

ID_BYTES: Final = 10  # 80 bits -> 16 base32 characters, no padding
ID_PATTERN: Final = re.compile(r"^[a-z2-7]{16}$")
MAX_LABEL: Final = 64
MIN_PASSWORD: Final = 8
MAX_PASSWORD: Final = 256
MIN_TTL: Final = 10.0
ID_SCHEMA: Final[Mapping[str, Any]] = {"type": "string", "pattern": ID_PATTERN.pattern}
#: The fields `parse_request` accepts, as the OpenAPI document publishes them (with the limits it checks).
REQUEST_SCHEMA: Final[Mapping[str, Mapping[str, Any]]] = {
    "port": {**PORT_SCHEMA, "description": "The port inside the sandbox to expose (plain HTTP there)."},
    "label": {"type": "string", "minLength": 1, "maxLength": MAX_LABEL, "description": "For people only."},
    "password": {
        "type": "string",
        "minLength": MIN_PASSWORD,
        "maxLength": MAX_PASSWORD,
        "writeOnly": True,
        "description": "Protects the tunnel (login page, or HTTP Basic with any user name). Stored as an scrypt "
        "hash; never returned or logged.",
    },
    "ttl": {
        "type": "number",
        "minimum": MIN_TTL,
        "description": "Seconds until the tunnel expires (default and maximum: [tunnel] default_ttl, max_ttl).",
    },
    "rewrite_host": {
        "type": "boolean",
        "default": False,
        "description": "Send Host: localhost:<port> upstream, for dev servers that check Host.",
    },
}
REQUEST_FIELDS: Final = tuple(REQUEST_SCHEMA)

# scrypt cost: 2^14 * 8 * 128 B = 16 MiB and ~50 ms per check; the login throttle keeps guessing slow too.
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SCRYPT_LEN: Final = 32

#: Why a tunnel stopped: these are the `revoked_reason` values.
REVOKED_BY_API: Final = "revoked"
REVOKED_SANDBOX_GONE: Final = "sandbox_deleted"
#: A tunnel as its owner sees it; the store adds the last two (`TunnelStore.public`), which only it can tell.
TunnelState = Literal["active", "expired", "revoked", "sandbox_gone", "ingress_denied"]


def new_tunnel_id() -> str:
    return base64.b32encode(secrets.token_bytes(ID_BYTES)).decode().lower()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash` (base64), so the cost can rise later without breaking old records."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_LEN, maxmem=64 * 1024 * 1024
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time comparison of the derived key; a malformed stored hash never matches."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        derived = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(derived, expected)


@dataclass(frozen=True, slots=True)
class Tunnel:
    id: str
    sandbox: str
    address: str  # the sandbox address chosen at creation: the only upstream, and it must still be the sandbox's
    port: int
    created_at: float
    expires_at: float
    label: str | None = None
    password_hash: str | None = None
    rewrite_host: bool = False
    revoked_at: float | None = None
    revoked_reason: str | None = None

    @property
    def protected(self) -> bool:
        return self.password_hash is not None

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def live(self, now: float | None = None) -> bool:
        return self.revoked_at is None and not self.expired(now)

    def state(self, now: float | None = None) -> TunnelState:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expired(now) else "active"

    def revoke(self, reason: str, at: float | None = None) -> Tunnel:
        if self.revoked_at is not None:
            return self
        return replace(self, revoked_at=time.time() if at is None else at, revoked_reason=reason)

    def to_record(self) -> dict[str, Any]:
        """The stored form (with the password hash; never sent to clients)."""
        return {
            "id": self.id,
            "sandbox": self.sandbox,
            "address": self.address,
            "port": self.port,
            "label": self.label,
            "password_hash": self.password_hash,
            "rewrite_host": self.rewrite_host,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "revoked_reason": self.revoked_reason,
        }

    def to_public(self, url: str, state: TunnelState) -> TunnelView:
        """What the API answers: no hash, only whether there is a password."""
        return TunnelView(
            id=self.id,
            sandbox=self.sandbox,
            address=self.address,
            port=self.port,
            label=self.label,
            url=url,
            password_protected=self.protected,
            rewrite_host=self.rewrite_host,
            created_at=_iso(self.created_at),
            expires_at=_iso(self.expires_at),
            revoked_at=_iso(self.revoked_at) if self.revoked_at is not None else None,
            revoked_reason=self.revoked_reason,
            state=state,
        )

    def __repr__(self) -> str:  # never print the hash, even by accident in a log line
        return f"Tunnel(id={self.id!r}, sandbox={self.sandbox!r}, port={self.port}, state={self.state()!r})"


@dataclass(frozen=True, slots=True)
class TunnelView:
    """A temporary HTTPS URL for a sandbox port. Its id is the random first label of the URL."""

    id: Annotated[str, Note(ID_SCHEMA)]
    sandbox: str
    address: Annotated[str, Note(ADDRESS_SCHEMA, description="The sandbox address the tunnel forwards to.")]
    port: Annotated[int, Note(PORT_SCHEMA)]
    label: str | None
    url: Annotated[str, Note(description="https://<id>.<tunnel domain>/")]
    password_protected: bool
    rewrite_host: bool
    created_at: Annotated[str, Note(format="date-time")]
    expires_at: Annotated[str, Note(format="date-time")]
    revoked_at: Annotated[str | None, Note(format="date-time")]
    revoked_reason: Annotated[str | None, Note(description=f"{REVOKED_BY_API} (by the API) or {REVOKED_SANDBOX_GONE}.")]
    state: Annotated[
        TunnelState,
        Note(
            description="sandbox_gone: the sandbox was deleted or lost the address; about to be revoked. "
            "ingress_denied: the sandbox's ingress rules no longer permit it; not served while they do not."
        ),
    ]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def _bad(code: str, message: str, field: str | None) -> GatewayError:
    return GatewayError(code, message, field)


def parse_record(raw: object) -> Tunnel:
    """A stored record back into a Tunnel. Raises GatewayError(INVALID_TUNNEL_RECORD)."""
    if not isinstance(raw, Mapping):
        raise _bad("INVALID_TUNNEL_RECORD", "a tunnel record is an object", None)
    try:
        tunnel = Tunnel(
            id=str(raw["id"]),
            sandbox=str(raw["sandbox"]),
            address=str(raw["address"]),
            port=int(raw["port"]),
            created_at=float(raw["created_at"]),
            expires_at=float(raw["expires_at"]),
            label=None if raw.get("label") is None else str(raw["label"]),
            password_hash=None if raw.get("password_hash") is None else str(raw["password_hash"]),
            rewrite_host=bool(raw.get("rewrite_host", False)),
            revoked_at=None if raw.get("revoked_at") is None else float(raw["revoked_at"]),
            revoked_reason=None if raw.get("revoked_reason") is None else str(raw["revoked_reason"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad("INVALID_TUNNEL_RECORD", f"a tunnel record is missing or mistypes a field ({exc})", None) from None
    if not ID_PATTERN.fullmatch(tunnel.id) or not 1 <= tunnel.port <= 65535:
        raise _bad("INVALID_TUNNEL_RECORD", f"tunnel record {tunnel.id!r} has a bad id or port", "id")
    return tunnel


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    """A validated `POST /v1/sandboxes/{id}/tunnels` body."""

    port: int
    label: str | None
    password: str | None
    ttl: float
    rewrite_host: bool

    def __repr__(self) -> str:
        return f"TunnelRequest(port={self.port}, label={self.label!r}, password={'***' if self.password else None})"


def parse_request(raw: object, *, default_ttl: float, max_ttl: float) -> TunnelRequest:
    """Validate an expose request. Stable codes: INVALID_TYPE, UNKNOWN_FIELD, MISSING_FIELD, INVALID_PORT,
    INVALID_LABEL, INVALID_PASSWORD, INVALID_TTL."""
    if not isinstance(raw, Mapping):
        raise _bad("INVALID_TYPE", "the body must be a JSON object", None)
    unknown = sorted(set(raw) - set(REQUEST_FIELDS))
    if unknown:
        raise _bad("UNKNOWN_FIELD", f"unknown field {unknown[0]!r}; expected: {', '.join(REQUEST_FIELDS)}", unknown[0])
    if "port" not in raw:
        raise _bad("MISSING_FIELD", "port is required (the sandbox port to expose)", "port")
    port = raw["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _bad("INVALID_PORT", f"port must be an integer in 1-65535, got {port!r}", "port")
    label = raw.get("label")
    if label is not None:
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL or not label.isprintable():
            raise _bad("INVALID_LABEL", f"label must be 1-{MAX_LABEL} printable characters", "label")
        label = label.strip()
    password = raw.get("password")
    if password is not None and (
        not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD or "\x00" in password
    ):
        # The message never echoes the value.
        raise _bad(
            "INVALID_PASSWORD", f"password must be a string of {MIN_PASSWORD}-{MAX_PASSWORD} characters", "password"
        )
    ttl = raw.get("ttl", default_ttl)
    if (
        isinstance(ttl, bool)
        or not isinstance(ttl, int | float)
        or not math.isfinite(ttl)
        or not MIN_TTL <= ttl <= max_ttl
    ):
        raise _bad("INVALID_TTL", f"ttl must be a number of seconds in {MIN_TTL:g}-{max_ttl:g}", "ttl")
    rewrite = raw.get("rewrite_host", False)
    if not isinstance(rewrite, bool):
        raise _bad("INVALID_TYPE", "rewrite_host must be true or false", "rewrite_host")
    return TunnelRequest(port, label, password, float(ttl), rewrite)


def new_tunnel(sandbox: str, address: str, request: TunnelRequest, now: float | None = None) -> Tunnel:
    """Hashes the password (~50 ms of CPU): call it off the event loop."""
    now = time.time() if now is None else now
    return Tunnel(
        id=new_tunnel_id(),
        sandbox=sandbox,
        address=address,
        port=request.port,
        created_at=now,
        expires_at=now + request.ttl,
        label=request.label,
        password_hash=hash_password(request.password) if request.password is not None else None,
        rewrite_host=request.rewrite_host,
    )


# --------------------------------------------------------------------------- ingress rules


def ingress_refusal(ingress: Ingress, port: int, *, protected: bool) -> Forbidden | None:
    """Why a sandbox's ingress rules refuse a tunnel to `port` (checked at expose time and on every request,
    against the record as it is then), or None. Stable codes: INGRESS_PORT_NOT_ALLOWED (`ingress.ports` is set
    and does not hold the port), INGRESS_PASSWORD_REQUIRED (`ingress.public_access` is false and the tunnel
    has no password: without public access nobody reaches the sandbox without a credential)."""
    if ingress.ports and port not in ingress.ports:
        allowed = ", ".join(map(str, ingress.ports))
        return Forbidden("INGRESS_PORT_NOT_ALLOWED", f"port {port} is not in the sandbox's ingress.ports ({allowed})")
    if not ingress.public_access and not protected:
        return Forbidden(
            "INGRESS_PASSWORD_REQUIRED",
            "the sandbox's ingress.public_access is false: its tunnels need a password",
            "password",
        )
    return None


def source_refusal(ingress: Ingress, client: str) -> Forbidden | None:
    """Why `ingress.sources` refuses a client address (the peer the tunnel server sees), or None."""
    if not ingress.sources:
        return None
    address = peer_address(client)
    if address is not None and any(address in network for network in ingress.sources):
        return None
    return Forbidden("INGRESS_SOURCE_DENIED", "this preview is not served to your address (ingress.sources)")


@functools.lru_cache(maxsize=4096)
def peer_address(text: str) -> IPAddress | None:
    """A client's address as the ingress rules see it (an IPv4-mapped IPv6 address is the IPv4 address)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
