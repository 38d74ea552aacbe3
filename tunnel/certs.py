"""The tunnel's TLS material: a local CA and a wildcard leaf for `*.<domain>`, and a reloading SSLContext.

`init_certs` is idempotent: a CA and leaf that still load, match the domain, chain to
each other and are not close to expiry are kept (so browsers that already trust the CA
keep trusting it); `force=True` renews them. Private keys are written 0600 through a
temporary file and an atomic rename, so a reader never sees half a key.

`ReloadingTLS` serves an operator-supplied certificate too: every handshake's SNI
callback swaps in the newest SSLContext, rebuilt when `gateway.files.FileWatch` says the
files changed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import GatewayError
from gateway.files import FileWatch, write_atomic
from gateway.x509util import cert_pem, fingerprint, fresh, key_pem, load_pair, make_ca, utc_now

log = structlog.get_logger("gateway.tunnel.certs")

CA_DAYS = 3650
LEAF_DAYS = 397  # browsers refuse leaves valid for longer than 398 days


@dataclass(frozen=True, slots=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class CertResult:
    created_ca: bool
    created_leaf: bool
    paths: CertPaths
    domain: str
    ca_fingerprint: str  # SHA-256, hex with colons

    def trust_instructions(self) -> str:
        ca = self.paths.ca_cert
        return "\n".join(
            [
                f"Tunnel certificate for *.{self.domain} and {self.domain}: {self.paths.cert}",
                f"Local CA: {ca} (SHA-256 {self.ca_fingerprint})",
                "Trust the CA (only on machines that should reach the tunnels):",
                f"  Debian/Ubuntu: sudo cp {ca} /usr/local/share/ca-certificates/gateway-tunnel-ca.crt"
                " && sudo update-ca-certificates",
                f"  Chromium/Firefox (NSS): certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n gateway-tunnel-ca -i {ca}",
                f"  macOS: sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {ca}",
                f"  curl / Python: --cacert {ca} / ssl.create_default_context(cafile='{ca}')",
            ]
        )


def _leaf_names(domain: str) -> list[str]:
    return [f"*.{domain}", domain]


def _leaf_matches(leaf: x509.Certificate, ca: x509.Certificate, domain: str) -> bool:
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
        leaf.verify_directly_issued_by(ca)
    except (x509.ExtensionNotFound, ValueError, TypeError, Exception):
        return False
    return sorted(names) == sorted(_leaf_names(domain))


def _make_leaf(
    domain: str, ca: x509.Certificate, ca_key: CertificateIssuerPrivateKeyTypes
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = utc_now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{domain}")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=LEAF_DAYS), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in _leaf_names(domain)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def init_certs(domain: str, paths: CertPaths, *, force: bool = False) -> CertResult:
    """Create (or keep) the local CA and the wildcard leaf. Raises GatewayError(CERT_WRITE_FAILED)."""
    domain = domain.strip().lower().rstrip(".")
    try:
        ipaddress.ip_address(domain)
        raise GatewayError("INVALID_DOMAIN", "the tunnel domain must be a DNS name, not an address", "domain")
    except ValueError:
        pass
    try:
        ca_pair = None if force else load_pair(paths.ca_cert, paths.ca_key)
        created_ca = False
        ca_key: CertificateIssuerPrivateKeyTypes
        if ca_pair is None or not fresh(ca_pair[0]):
            # Only names under the tunnel domain: a stolen CA key cannot impersonate other sites.
            name = f"Sandbox gateway tunnel CA for {domain}"
            ca_cert, ca_key = make_ca(name, [domain], CA_DAYS, exclude_addresses=True)
            write_atomic(paths.ca_key, key_pem(ca_key), 0o600)
            write_atomic(paths.ca_cert, cert_pem(ca_cert), 0o644)
            created_ca = True
        else:
            ca_cert, ca_key = ca_pair
        leaf_pair = None if (force or created_ca) else load_pair(paths.cert, paths.key)
        created_leaf = False
        if leaf_pair is None or not fresh(leaf_pair[0]) or not _leaf_matches(leaf_pair[0], ca_cert, domain):
            leaf, leaf_key = _make_leaf(domain, ca_cert, ca_key)
            write_atomic(paths.key, key_pem(leaf_key), 0o600)
            # The chain (leaf then CA) so clients that only trust the CA can build the path.
            chain = cert_pem(leaf) + cert_pem(ca_cert)
            write_atomic(paths.cert, chain, 0o644)
            created_leaf = True
    except OSError as exc:
        raise GatewayError("CERT_WRITE_FAILED", f"could not write the tunnel certificates: {exc}") from exc
    return CertResult(created_ca, created_leaf, paths, domain, fingerprint(ca_cert))


# --------------------------------------------------------------------------- serving


def _regular_files(*paths: Path) -> bool:
    """False while a file is missing or not a regular file (a FIFO in its place would block the handshake that
    reloads it): the previous pair keeps serving."""
    try:
        return all(stat.S_ISREG(p.stat().st_mode) for p in paths)
    except OSError:
        return False


def build_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for the certificate chain and key. Raises GatewayError(CERT_INVALID)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # the tunnel serves HTTP/1.1 only
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise GatewayError(
            "CERT_INVALID", f"cannot load the tunnel certificate {cert} / key {key}: {exc}", "tunnel.cert_path"
        ) from None
    return context


class ReloadingTLS:
    """An SSLContext whose certificate follows the files: a changed pair is loaded at the next handshake.

    The outer context is what the listening socket uses; its SNI callback hands each
    handshake the newest inner context. A pair that fails to load (a half-written
    renewal) is logged and the previous one keeps serving.
    """

    def __init__(self, cert: Path, key: Path, *, check_interval: float = 1.0) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._watch = FileWatch([self.cert, self.key])
        self._watch.changed()  # the pair loaded now is what later checks compare against
        self._current = build_server_context(self.cert, self.key)
        self._checked = 0.0
        self.reloads = 0
        self.context = build_server_context(self.cert, self.key)
        self.context.sni_callback = self._on_sni

    def _on_sni(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self.current()

    def current(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked < self.check_interval:
            return self._current
        with self._lock:
            self._checked = now
            # A pair that fails to load is not tried again until the files change again.
            if self._watch.changed() and _regular_files(self.cert, self.key):
                try:
                    self._current = build_server_context(self.cert, self.key)
                    self.reloads += 1
                    log.info("tunnel.cert_reloaded", cert=str(self.cert))
                except Exception as exc:  # whatever the files hold, the previous pair keeps serving
                    reason = exc.message if isinstance(exc, GatewayError) else f"{type(exc).__name__}: {exc}"
                    log.error("tunnel.cert_reload_failed", cert=str(self.cert), error=reason)
        return self._current
