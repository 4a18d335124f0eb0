"""A throwaway certificate authority for TLS tests: server certificates for 127.0.0.1/localhost,
client certificates for mutual TLS, and deliberately broken ones (expired, wrong key)."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.waiting import wait_until_sync

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    serial: int


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "edgecache test CA") -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = directory / "ca.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        *,
        client: bool = False,
        valid_days: float = 10,
        key: Key | None = None,
        organization: str | None = None,
    ) -> Issued:
        """A leaf certificate (server: SAN 127.0.0.1 and localhost) written as name.pem/name-key.pem."""
        own_key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        if organization:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        now = datetime.datetime.now(datetime.UTC)
        start = now - datetime.timedelta(days=2)
        serial = x509.random_serial_number()
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.cert.subject)
            .public_key(own_key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if not client:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written_key = key or own_key
        key_path.write_bytes(
            written_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return Issued(cert_path, key_path, serial)


def served_serial(port: int) -> int:
    """The serial number of the certificate a TLS listener on 127.0.0.1:`port` presents now."""
    pem = ssl.get_server_certificate(("127.0.0.1", port), timeout=5)
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def wait_for_serial(port: int, serial: int, timeout: float = 30.0, streak: int = 10) -> int:
    """Wait until `streak` new connections in a row get the certificate `serial` (after a reload the
    old worker may still accept a few connections until it stops; a connection refused or cut while
    workers change counts as "not yet" and starts the streak over). Returns `streak`."""
    seen = 0
    last: list[int | None] = [None]

    def streak_done() -> int:
        nonlocal seen
        in_a_row, seen = seen, 0  # an error below leaves it at 0: the streak starts over
        last[0] = served_serial(port)
        seen = in_a_row + 1 if last[0] == serial else 0
        return seen if seen >= streak else 0

    return wait_until_sync(
        streak_done,
        timeout=timeout,
        interval=0.1,
        message=lambda: f"new connections to {port} still get serial {last[0]}, not {serial}",
    )
