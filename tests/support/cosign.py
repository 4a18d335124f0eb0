"""Key pairs in the cosign/sigstore format, made with `cryptography`, for skopeo to sign with.

skopeo 1.9 signs with `--sign-by-sigstore-private-key KEY --sign-passphrase-file F` but has no
`generate-sigstore-key` (added in 1.10), and cosign is not packaged in Debian. Debian's build of
skopeo 1.9 (and of podman, from the same containers/image) has sigstore patched out: signing fails
with "creating signature: Debian-local change: sigstore disabled" and a `sigstoreSigned` policy
rejects every image with the same words. So the keys below are what skopeo and cosign would read,
and `sign_image` writes signatures the way they do, through the registry's real push API. The format
is small enough to write here: a PEM block "ENCRYPTED SIGSTORE PRIVATE KEY" whose body is JSON
(go-securesystemslib's `encrypted` package):

    {"kdf": {"name": "scrypt", "params": {"N": 32768, "r": 8, "p": 1}, "salt": b64(32 bytes)},
     "cipher": {"name": "nacl/secretbox", "nonce": b64(24 bytes)},
     "ciphertext": b64(secretbox(PKCS#8 DER of the private key, scrypt(passphrase, salt)))}

NaCl's secretbox (XSalsa20 with a Poly1305 tag in front) is not in `cryptography`: the Salsa20 core is
written out below (Poly1305 is `cryptography`'s). Only a few hundred bytes are ever encrypted.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.poly1305 import Poly1305

from tests.support.images import OCI_CONFIG, OCI_MANIFEST, Blob, Pusher, sha256

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
SIGMA = b"expand 32-byte k"
MASK = 0xFFFFFFFF


def _rotl(value: int, shift: int) -> int:
    return ((value << shift) | (value >> (32 - shift))) & MASK


def _rounds(state: list[int]) -> list[int]:
    x = list(state)
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (5, 9, 13, 1), (10, 14, 2, 6), (15, 3, 7, 11)):  # columns
            x[b] ^= _rotl((x[a] + x[d]) & MASK, 7)
            x[c] ^= _rotl((x[b] + x[a]) & MASK, 9)
            x[d] ^= _rotl((x[c] + x[b]) & MASK, 13)
            x[a] ^= _rotl((x[d] + x[c]) & MASK, 18)
        for a, b, c, d in ((0, 1, 2, 3), (5, 6, 7, 4), (10, 11, 8, 9), (15, 12, 13, 14)):  # rows
            x[b] ^= _rotl((x[a] + x[d]) & MASK, 7)
            x[c] ^= _rotl((x[b] + x[a]) & MASK, 9)
            x[d] ^= _rotl((x[c] + x[b]) & MASK, 13)
            x[a] ^= _rotl((x[d] + x[c]) & MASK, 18)
    return x


def _state(key: bytes, sixteen: bytes) -> list[int]:
    k = struct.unpack("<8I", key)
    n = struct.unpack("<4I", sixteen)
    c = struct.unpack("<4I", SIGMA)
    return [c[0], *k[:4], c[1], *n, c[2], *k[4:], c[3]]


def _hsalsa20(key: bytes, nonce16: bytes) -> bytes:
    x = _rounds(_state(key, nonce16))
    return struct.pack("<8I", *(x[i] for i in (0, 5, 10, 15, 6, 7, 8, 9)))


def _salsa20_stream(key: bytes, nonce8: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        state = _state(key, nonce8 + struct.pack("<Q", counter))
        mixed = _rounds(state)
        out += struct.pack("<16I", *((m + s) & MASK for m, s in zip(mixed, state, strict=True)))
        counter += 1
    return bytes(out[:length])


def secretbox_seal(plaintext: bytes, nonce: bytes, key: bytes) -> bytes:
    """NaCl crypto_secretbox (XSalsa20-Poly1305): tag || ciphertext, as Go's secretbox.Seal writes."""
    subkey = _hsalsa20(key, nonce[:16])
    stream = _salsa20_stream(subkey, nonce[16:], 32 + len(plaintext))
    ciphertext = bytes(p ^ s for p, s in zip(plaintext, stream[32:], strict=True))
    return Poly1305.generate_tag(stream[:32], ciphertext) + ciphertext


@dataclass
class KeyPair:
    private_pem: Path  # encrypted, for skopeo
    passphrase_file: Path
    public_pem: Path  # for edgecache's [[trust.rules]] keys
    key: PrivateKey


def make_key_pair(directory: Path, name: str, kind: str = "ecdsa") -> KeyPair:
    """A fresh key pair under `directory`: `<name>.key` (cosign's encrypted format), `<name>.pub` and
    `<name>.pass`. `kind`: ecdsa (P-256, what cosign makes), rsa or ed25519."""
    key: PrivateKey
    if kind == "ecdsa":
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    directory.mkdir(parents=True, exist_ok=True)
    passphrase = b"edgecache-test-passphrase"
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    salt, nonce = os.urandom(32), os.urandom(24)
    secret = Scrypt(salt=salt, length=32, n=32768, r=8, p=1).derive(passphrase)
    document = {
        "kdf": {"name": "scrypt", "params": {"N": 32768, "r": 8, "p": 1}, "salt": _b64(salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
        "ciphertext": _b64(secretbox_seal(der, nonce, secret)),
    }
    body = base64.encodebytes(json.dumps(document).encode()).decode()
    private_pem = directory / f"{name}.key"
    label = "ENCRYPTED SIGSTORE PRIVATE KEY"
    private_pem.write_text(f"-----BEGIN {label}-----\n{body}-----END {label}-----\n")
    public_pem = directory / f"{name}.pub"
    public_pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    passphrase_file = directory / f"{name}.pass"
    passphrase_file.write_bytes(passphrase)
    return KeyPair(private_pem, passphrase_file, public_pem, key)


def sign_payload(key: PrivateKey, payload: bytes) -> bytes:
    """A signature as cosign makes one (ECDSA/RSA PKCS#1 v1.5 over SHA-256; Ed25519 over the bytes)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(payload, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        from cryptography.hazmat.primitives.asymmetric import padding

        return key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(payload)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"


def simple_signing_payload(manifest_digest: str, reference: str) -> bytes:
    """The payload cosign and skopeo sign (the "cosign container image signature" document)."""
    document = {
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    }
    return json.dumps(document).encode()


def signature_manifest(pusher: Pusher, repo: str, layers: list[tuple[bytes, bytes]]) -> Blob:
    """Push the payloads and a config, and return the signature manifest that lists them, laid out as
    containers/image writes sigstore attachments: an OCI manifest whose layers are simple-signing
    payloads with the base64 signature in `dev.cosignproject.cosign/signature`."""
    descriptors = []
    for payload, signature in layers:
        pusher.push_blob(repo, payload)
        descriptors.append(
            {
                "mediaType": SIMPLE_SIGNING,
                "size": len(payload),
                "digest": sha256(payload),
                "annotations": {"dev.cosignproject.cosign/signature": base64.b64encode(signature).decode()},
            }
        )
    config = json.dumps(
        {
            "architecture": "",
            "os": "",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
        }
    ).encode()
    pusher.push_blob(repo, config)
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "size": len(config), "digest": sha256(config)},
        "layers": descriptors,
    }
    return Blob(json.dumps(document).encode(), OCI_MANIFEST)


def sign_image(
    pusher: Pusher,
    repo: str,
    manifest_digest: str,
    key: PrivateKey,
    *,
    reference: str | None = None,
    signed_digest: str | None = None,
) -> Blob:
    """Attach a signature of `manifest_digest` by `key` under `sha256-<hex>.sig` in `repo`.
    `reference` and `signed_digest` default to the truth; tests change them to tamper."""
    payload = simple_signing_payload(signed_digest or manifest_digest, reference or f"registry.test/{repo}:1")
    manifest = signature_manifest(pusher, repo, [(payload, sign_payload(key, payload))])
    pusher.push_manifest(repo, manifest_digest.replace(":", "-") + ".sig", manifest)
    return manifest
