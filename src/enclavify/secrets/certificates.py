"""Private keys as PEM and self-signed certificates, for session secrets and the CAS's own PKI.

Keys are written unencrypted in PKCS#8. The files that contain them are protected by their mode
(and session secrets by the CAS's storage), because a passphrase would have to be entered by a
person at every start of an unattended service.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

# Certificates start slightly in the past so a peer whose clock is a little behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)


def private_key_pem(key: PrivateKey) -> bytes:
    """Return ``key`` as an unencrypted PKCS#8 PEM block."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def self_signed_certificate(
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    now: dt.datetime,
    valid_for: dt.timedelta,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """Return a certificate for ``key`` signed by itself, named ``common_name``.

    It is valid from :data:`CLOCK_SKEW` before ``now`` until ``now + valid_for`` and carries
    ``extensions``, each given with whether it is critical.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + valid_for)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, hashes.SHA256())
