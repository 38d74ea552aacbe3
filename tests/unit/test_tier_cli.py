"""`gateway certs ca`: the certificate on stdout (so it can be saved as is), notes and instructions on stderr;
`certs init` (the tunnel's) still lives in the same group."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from gateway.cli import main


def test_certs_ca_prints_the_certificate_and_makes_it_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[inspection]\nca_dir = "{tmp_path / "ca"}"\npermitted_domains = ["example.org"]\n')
    assert main(["certs", "ca", "--config", str(config)]) == 0
    first = capsys.readouterr()
    cert = x509.load_pem_x509_certificate(first.out.encode())  # stdout is exactly one certificate
    assert first.out.startswith("-----BEGIN CERTIFICATE-----") and first.out.endswith("-----END CERTIFICATE-----\n")
    assert "created the inspection CA" in first.err and "NODE_EXTRA_CA_CERTS" in first.err
    assert main(["certs", "ca", "--config", str(config)]) == 0
    second = capsys.readouterr()
    assert second.out == first.out and "created" not in second.err
    assert "inspection CA" in cert.subject.rfc4514_string()


def test_certs_ca_refuses_a_ca_that_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[inspection]\nca_dir = "{tmp_path}"\npermitted_domains = ["example.org"]\n')
    assert main(["certs", "ca", "--config", str(config)]) == 0
    config.write_text(f'[inspection]\nca_dir = "{tmp_path}"\npermitted_domains = ["example.com"]\n')
    capsys.readouterr()
    assert main(["certs", "ca", "--config", str(config)]) == 2
    answer = capsys.readouterr()
    assert answer.out == "" and "INSPECTION_CA_INVALID" in answer.err


def test_certs_is_one_group_with_both_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", "--dir", str(tmp_path), "--domain", "tunnel.example.test"]) == 0
    assert "created CA and certificate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["certs", "--help"])
    assert {"init", "ca"} <= set(capsys.readouterr().out.split())
