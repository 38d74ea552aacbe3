"""The inspection CA: made once in mitmproxy's confdir layout, never replaced, name-constrained on request."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from gateway.errors import GatewayError
from gateway.tier.ca import CERT_FILE, KEY_FILE, ensure_ca, trust_instructions


def _leaf_for(ca_dir: Path, name: str) -> x509.Certificate:
    """A leaf signed with the CA's key, as mitmproxy would make one for `name`."""
    raw = (ca_dir / KEY_FILE).read_bytes()
    ca_key = serialization.load_pem_private_key(raw, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(raw)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _verifies(ca_dir: Path, name: str) -> bool:
    ca = x509.load_pem_x509_certificate((ca_dir / CERT_FILE).read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName(name))
    try:
        verifier.verify(_leaf_for(ca_dir, name), [])
    except VerificationError:
        return False
    return True


def test_made_once_private_and_in_mitmproxys_layout(tmp_path: Path) -> None:
    ca_dir = tmp_path / "inspection"
    first = ensure_ca(ca_dir, ())
    assert first.created and first.permitted == ()
    assert stat.S_IMODE((ca_dir / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    both = (ca_dir / KEY_FILE).read_text()
    assert "PRIVATE KEY" in both and first.pem in both and (ca_dir / CERT_FILE).read_text() == first.pem
    again = ensure_ca(ca_dir, ())
    assert not again.created and again.fingerprint == first.fingerprint
    (ca_dir / CERT_FILE).unlink()  # the public half is restored from the key file, never a new CA
    assert ensure_ca(ca_dir, ()).fingerprint == first.fingerprint and (ca_dir / CERT_FILE).exists()
    assert _verifies(ca_dir, "anything.example")


def test_permitted_domains_constrain_what_it_vouches_for(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path, ("github.com", "example.org"))
    assert ca.permitted == ("example.org", "github.com")
    assert _verifies(tmp_path, "api.github.com") and _verifies(tmp_path, "example.org")
    assert not _verifies(tmp_path, "bank.example")
    assert ensure_ca(tmp_path, ("example.org", "github.com")).fingerprint == ca.fingerprint
    text = trust_instructions(ca)
    for words in ("update-ca-certificates", "apk add", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "keytool"):
        assert words in text
    assert ca.fingerprint in text and "example.org, github.com" in text


def test_a_ca_that_does_not_fit_is_refused_never_replaced(tmp_path: Path) -> None:
    ensure_ca(tmp_path, ("github.com",))
    before = (tmp_path / KEY_FILE).read_bytes()
    with pytest.raises(GatewayError) as caught:
        ensure_ca(tmp_path, ("gitlab.com",))
    assert caught.value.code == "INSPECTION_CA_INVALID" and "permits github.com" in caught.value.message
    (tmp_path / KEY_FILE).write_bytes(before[: len(before) // 2])
    with pytest.raises(GatewayError) as caught:
        ensure_ca(tmp_path, ("github.com",))
    assert caught.value.code == "INSPECTION_CA_INVALID" and "does not load" in caught.value.message
    assert (tmp_path / KEY_FILE).read_bytes() == before[: len(before) // 2]
