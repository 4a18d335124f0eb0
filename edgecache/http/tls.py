"""Certificates for the TLS listener: checked before use, so a bad file is one clear line at start-up
(or a refused reload), never a listener that fails every handshake.

Also the Python ssl context of the mutual-TLS listener (aiohttp), with the same policy as granian's
rustls: TLS 1.2 or newer, AEAD ciphers only (rustls has no others), ALPN http/1.1.
"""

from __future__ import annotations

import datetime
import logging
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from edgecache.errors import ConfigError

log = logging.getLogger(__name__)
EXPIRY_WARNING = datetime.timedelta(days=14)
AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # TLS 1.2 suites; TLS 1.3 has only AEAD suites


def check_certificate(cert_path: str, key_path: str) -> x509.Certificate:
    """Refuse an unreadable, expired or not-yet-valid certificate, or a key that is not its key."""
    try:
        with open(cert_path, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
    except OSError as exc:
        raise ConfigError(f"server.tls_cert: cannot read {cert_path} ({exc.strerror})") from None
    except ValueError:
        raise ConfigError(f"server.tls_cert: {cert_path} is not a PEM certificate") from None
    try:
        with open(key_path, "rb") as fh:
            key: PrivateKeyTypes = serialization.load_pem_private_key(fh.read(), password=None)
    except OSError as exc:
        raise ConfigError(f"server.tls_key: cannot read {key_path} ({exc.strerror})") from None
    except (ValueError, TypeError):
        raise ConfigError(f"server.tls_key: {key_path} is not an unencrypted PEM private key") from None
    now = datetime.datetime.now(datetime.UTC)
    subject = cert.subject.rfc4514_string()
    if cert.not_valid_after_utc <= now:
        expired = f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        raise ConfigError(f"server.tls_cert: {cert_path} ({subject}) expired on {expired}")
    if cert.not_valid_before_utc > now:
        raise ConfigError(
            f"server.tls_cert: {cert_path} ({subject}) is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public != expected:
        raise ConfigError(f"server.tls_key: {key_path} is not the private key of {cert_path} ({subject})")
    if cert.not_valid_after_utc - now < EXPIRY_WARNING:
        log.warning("TLS certificate %s expires on %s", subject, cert.not_valid_after_utc.isoformat())
    return cert


def mutual_tls_context(cert_path: str, key_path: str, client_ca: str) -> ssl.SSLContext:
    """A server context that requires a client certificate signed by `client_ca`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(AEAD_CIPHERS)
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(cert_path, key_path)
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"access.client_ca: cannot load {client_ca} ({exc})") from None
    return context
