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
from proxy.errors import ConfigError

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


def _load_certificate(context: ssl.SSLContext, cert_file: Path, key_file: Path | None) -> None:
    """Load the configured certificate and key (the key may sit in the certificate file), or say which failed."""
    for path in (cert_file, key_file):
        if path is not None:
            try:
                path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read TLS certificate or key: {exc.strerror}") from None
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, ValueError) as exc:
        files = f"{cert_file} and {key_file}" if key_file else str(cert_file)
        raise ConfigError(f"{files}: not a usable PEM certificate and matching private key ({exc})") from None


def server_context(settings: TLSSettings) -> ssl.SSLContext:
    """The context clients' TLS connections are accepted with."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.key_file and not settings.cert_file:
        raise ConfigError(f"[tls] key_file {settings.key_file} is set but cert_file is not")
    if settings.cert_file:
        _load_certificate(context, settings.cert_file, settings.key_file)
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
        try:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{ca_file}: cannot load the backend CA file: {reason}") from None
        context.check_hostname = True
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
