"""X.509 helpers the gateway's two local CAs share: the tunnel's (tunnel/certs.py) and the inspection tier's
(gateway/tier/ca.py).

Both CAs are EC P-256, self-signed, name-constrained where a set of names is known, and written with their
keys 0600; what differs (names, validity, file layout, what a leaf needs) stays with each. Neither component
imports the other: this module is the neutral ground.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

ORGANIZATION = "Sandbox gateway (local)"
#: A certificate this close to its end counts as expiring: it is renewed, or refused with a warning in time.
RENEW_BEFORE = dt.timedelta(days=30)

#: Key types a certificate can be signed with (a key of another kind cannot be a CA's).
ISSUER_KEYS = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes] | None:
    """The certificate and its key, or None when either does not load or they do not belong together. One file
    may hold both (the first certificate and the first key in it are taken)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ISSUER_KEYS) or cert.public_key() != key.public_key():
        return None
    return cert, key


def fresh(cert: x509.Certificate) -> bool:
    """Valid now and for longer than RENEW_BEFORE."""
    now = utc_now()
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - RENEW_BEFORE > now


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256, upper-case hex with colons (as browsers and `openssl x509 -fingerprint` show it)."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def permitted_names(cert: x509.Certificate) -> tuple[str, ...] | None:
    """The DNS names a CA's name constraints permit, sorted; None when it has no name constraints."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    return tuple(sorted(str(s.value) for s in constraints.permitted_subtrees or () if isinstance(s, x509.DNSName)))


def make_ca(
    common_name: str, permitted: Sequence[str], days: int, *, exclude_addresses: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA that signs leaves only (path length 0). With `permitted` names it may vouch only for
    those names and the names under them (and, with `exclude_addresses`, for no IP address): a stolen key cannot
    impersonate other sites to machines that trust it (browsers, OpenSSL, Go, Java and Node enforce name
    constraints)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = utc_now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if permitted:
        # RFC 5280 constrains each name type on its own: DNS subtrees alone leave the CA vouching for any address.
        excluded: list[x509.GeneralName] | None = None
        if exclude_addresses:
            excluded = [x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")), x509.IPAddress(ipaddress.ip_network("::/0"))]
        constraints = x509.NameConstraints([x509.DNSName(n) for n in permitted], excluded)
        builder = builder.add_extension(constraints, critical=True)
    return builder.sign(key, hashes.SHA256()), key
