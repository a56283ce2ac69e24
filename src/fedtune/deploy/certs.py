"""Test-federation credentials: a CA, the coordinator's TLS certificate, and client enrolment keys.

What ``fedtune certs DIR`` writes (EC P-384 throughout, the curve Flower's docs use):
  ca.crt, ca.key               the certificate authority clients trust (keep ca.key private)
  server.pem, server.key       the coordinator's TLS certificate, valid for the given hosts
  clients/NAME.key, NAME.pub   one enrolment key pair per client (OpenSSH format, as Flower wants):
                               NAME.key goes to that client only; the coordinator enrols NAME.pub
A production federation would use its own CA; these files are for tests and trials.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.errors import ConfigError

CURVE = ec.SECP384R1


def write_certs(
    out: Path, hosts: Sequence[str], clients: Sequence[str], days: int = 365, overwrite: bool = False
) -> list[Path]:
    """Create the CA, a server certificate for ``hosts`` and a key pair per client name; return the files."""
    if (out / "ca.crt").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a CA (ca.crt); pass --overwrite to replace it, or choose another DIR")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune test CA")])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(CURVE())
    server = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ca_name, server_key.public_key(), now, days
        )
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    written = [
        _write(out / "ca.key", _pem_key(ca_key), private=True),
        _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
        _write(out / "server.key", _pem_key(server_key), private=True),
        _write(out / "server.pem", server.public_bytes(serialization.Encoding.PEM)),
    ]
    for name in clients:
        written += write_client_key(out / "clients", name)
    return written


def write_client_key(folder: Path, name: str) -> list[Path]:
    """One client's enrolment key pair: folder/NAME.key (private) and folder/NAME.pub (to enrol)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    folder.mkdir(parents=True, exist_ok=True)
    return [_write(folder / f"{name}.key", private, private=True), _write(folder / f"{name}.pub", public + b"\n")]


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime, days: int) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path
