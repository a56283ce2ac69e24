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
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.core.errors import ConfigError

CURVE = ec.SECP384R1
_KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def write_certs(
    out: Path, hosts: Sequence[str], clients: Sequence[str], days: int = 365, overwrite: bool = False
) -> list[Path]:
    """Create the CA, a server certificate for ``hosts`` and a key pair per client name; return the files."""
    if (out / "ca.crt").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a CA (ca.crt); pass --overwrite to replace it, or choose another DIR")
    check_new_keys(out / "clients", clients, overwrite)  # before anything is written
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
        written += write_client_key(out / "clients", name, overwrite)
    return written


def add_client_keys(folder: Path, names: Sequence[str], overwrite: bool = False) -> list[Path]:
    """Key pairs for ``names`` in ``folder``, all checked (valid, new unless ``overwrite``) before any is written."""
    check_new_keys(folder, names, overwrite)
    return [p for name in names for p in write_client_key(folder, name, overwrite)]


def check_new_keys(folder: Path, names: Sequence[str], overwrite: bool) -> None:
    """Refuse names that are not plain file names, repeats, and (unless ``overwrite``) existing keys."""
    for name in names:
        if not _KEY_NAME.fullmatch(name):
            raise ConfigError(
                f"client name {name!r} is not a plain file name: use letters, digits, '.', '_' and '-' "
                "(not starting with '.')"
            )
    if len(set(names)) < len(names):
        raise ConfigError(f"client names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    taken = [f"{folder / n}.key" for n in names if (folder / f"{n}.key").exists() or (folder / f"{n}.pub").exists()]
    if taken and not overwrite:
        raise ConfigError(
            f"{', '.join(taken)} already exist(s): a client key is never replaced silently (its public key may be "
            "enrolled). Choose another --name, or pass --overwrite and enrol the new public key instead of the old"
        )


def write_client_key(folder: Path, name: str, overwrite: bool = False) -> list[Path]:
    """One client's enrolment key pair: folder/NAME.key (private) and folder/NAME.pub (to enrol)."""
    check_new_keys(folder, [name], overwrite)
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    folder.mkdir(parents=True, exist_ok=True)
    key_path = _write(folder / f"{name}.key", private, private=True, replace=overwrite)
    return [key_path, _write(folder / f"{name}.pub", public + b"\n", replace=overwrite)]


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


def _write(path: Path, data: bytes, private: bool = False, replace: bool = True) -> Path:
    """Write ``data`` to ``path`` through a fresh temporary file created with its final mode (0600 for
    a private key: never readable by others, not even for a moment), then renamed over ``path``; with
    ``replace=False`` linked to ``path`` only if nothing is there by then (a key created meanwhile, by
    another ``fedtune certs`` for one, is never overwritten: ConfigError)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if not private:
            os.chmod(tmp, 0o644)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: the check and the write are one step
            except FileExistsError:
                raise ConfigError(f"{path} appeared while it was being written: nothing was replaced") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not replace:
        Path(tmp).unlink(missing_ok=True)
    return path
