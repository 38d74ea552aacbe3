"""The inspection CA: what sandboxes trust so that the tier may decrypt the hosts their policies mark.

Apart from the tunnel's CA (tunnel/certs.py): trusting one must not mean trusting the other. Its files are laid
out as mitmproxy's confdir wants them: `mitmproxy-ca.pem` (key then certificate, 0600; mitmproxy signs each
leaf with it) and `mitmproxy-ca-cert.pem` (the certificate alone, what sandboxes are given). The directory is
0700: mitmproxy also reads options from `config.yaml` there.

`ensure_ca` never replaces a CA that exists: sandboxes already trust it. One that no longer loads, has expired
or was made for other permitted domains is refused (INSPECTION_CA_INVALID) with what to do; the operator
deletes it deliberately. With `permitted_domains` the CA vouches only for those names and the names under them
(IP addresses stay unconstrained: see `ensure_ca`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from gateway.errors import GatewayError
from gateway.files import write_atomic
from gateway.x509util import cert_pem, fingerprint, fresh, key_pem, load_pair, make_ca, permitted_names

CA_DAYS = 3650
KEY_FILE = "mitmproxy-ca.pem"
CERT_FILE = "mitmproxy-ca-cert.pem"


@dataclass(frozen=True, slots=True)
class InspectionCA:
    cert: x509.Certificate
    cert_path: Path
    created: bool

    @property
    def pem(self) -> str:
        return cert_pem(self.cert).decode()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @property
    def permitted(self) -> tuple[str, ...]:
        return permitted_names(self.cert) or ()


def _invalid(ca_dir: Path, why: str) -> GatewayError:
    return GatewayError(
        "INSPECTION_CA_INVALID",
        f"the inspection CA in {ca_dir} {why}; it is never replaced on its own (sandboxes trust it): delete "
        f"{ca_dir / KEY_FILE} and {ca_dir / CERT_FILE} to have a new one made, then give sandboxes the new one",
        "inspection.ca_dir",
    )


def ensure_ca(ca_dir: Path, permitted_domains: Sequence[str]) -> InspectionCA:
    """The CA in `ca_dir`, made now if there is none. Raises GatewayError(INSPECTION_CA_INVALID, CERT_WRITE_FAILED)."""
    key_path, cert_path = ca_dir / KEY_FILE, ca_dir / CERT_FILE
    if key_path.exists() or cert_path.exists():
        pair = load_pair(key_path, key_path)
        if pair is None:
            raise _invalid(ca_dir, f"does not load ({KEY_FILE} must hold the key and its certificate)")
        cert = pair[0]
        if not fresh(cert):
            raise _invalid(ca_dir, f"expires on {cert.not_valid_after_utc:%Y-%m-%d} or has expired")
        if permitted_domains and permitted_names(cert) != tuple(sorted(permitted_domains)):
            have = ", ".join(permitted_names(cert) or ("any name",))
            raise _invalid(ca_dir, f"permits {have}, not inspection.permitted_domains")
        if not cert_path.exists() or cert_path.read_bytes() != cert_pem(cert):
            write_atomic(cert_path, cert_pem(cert), 0o644)  # the public half, derived: safe to restore
        return InspectionCA(cert, cert_path, created=False)
    common_name = "Sandbox gateway inspection CA"
    # Addresses stay unconstrained: mitmproxy names the dialled address (the hand-over's vetted address) in every
    # leaf it makes, and an excluded IP subtree would make clients refuse each one.
    cert, key = make_ca(common_name, list(permitted_domains), CA_DAYS, exclude_addresses=False)
    try:
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca_dir.chmod(0o700)
        write_atomic(key_path, key_pem(key) + cert_pem(cert), 0o600)
        write_atomic(cert_path, cert_pem(cert), 0o644)
    except OSError as exc:
        message = f"could not write the inspection CA: {exc}"
        raise GatewayError("CERT_WRITE_FAILED", message, "inspection.ca_dir") from exc
    return InspectionCA(cert, cert_path, created=True)


def trust_instructions(ca: InspectionCA) -> str:
    """How a sandbox image comes to trust the CA, for people (`gateway certs ca`)."""
    scope = ", ".join(ca.permitted) if ca.permitted else "any name (set inspection.permitted_domains to constrain it)"
    name = "gateway-inspection-ca.crt"
    system = f"/usr/local/share/ca-certificates/{name}"
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    return "\n".join(
        [
            f"Inspection CA: {ca.cert_path} (SHA-256 {ca.fingerprint})",
            f"It vouches for: {scope}. Separate from the tunnel CA; give it only to sandboxes with inspected hosts.",
            f"Save it: gateway certs ca > {name}   (the certificate goes to stdout, these notes to stderr)",
            "In the sandbox image:",
            f"  Debian/Ubuntu: cp {name} {system} && update-ca-certificates",
            f"  Alpine:        apk add ca-certificates && cp {name} {system} && update-ca-certificates",
            f"  Python:        requests and httpx use certifi, not the system store: after the step above, "
            f"export REQUESTS_CA_BUNDLE={bundle} SSL_CERT_FILE={bundle}",
            f'                 (or append it to certifi: cat {name} >> "$(python -m certifi)")',
            f"  Node:          export NODE_EXTRA_CA_CERTS={system}",
            f"  Java:          keytool -importcert -noprompt -cacerts -storepass changeit -alias gateway-inspection "
            f"-file {name}",
        ]
    )
