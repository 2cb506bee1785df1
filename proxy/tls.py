"""TLS contexts for both sides, and a self-signed certificate made with `cryptography` when none is configured."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config import BackendTLSMode, TLSSettings

log = logging.getLogger(__name__)


def self_signed_pair(common_name: str = "dbproxy") -> tuple[bytes, bytes]:
    """A fresh P-256 key and a one-year certificate for localhost, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def server_context(settings: TLSSettings) -> ssl.SSLContext:
    """The context clients' TLS connections are accepted with."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file and settings.key_file:
        context.load_cert_chain(settings.cert_file, settings.key_file)
        return context
    cert_pem, key_pem = self_signed_pair()
    with tempfile.TemporaryDirectory() as folder:
        cert_path, key_path = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_path.write_bytes(cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(cert_path, key_path)
    log.info("TLS: no certificate configured; using a self-signed one made at start")
    return context


def backend_context(mode: BackendTLSMode, ca_file: Path | None) -> ssl.SSLContext | None:
    """The context the proxy connects to a database with, or None when TLS is off."""
    if mode is BackendTLSMode.DISABLE:
        return None
    if mode is BackendTLSMode.VERIFY_FULL:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        context.check_hostname = True
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
