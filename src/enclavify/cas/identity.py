"""Client identities: a private key and a self-signed certificate in one PEM file.

The CAS names a client by the SHA-256 of its public key, so the certificate's subject and
validity carry no meaning; they exist because TLS needs a certificate to present the key.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclavify import atomic
from enclavify.cas.client import Identity
from enclavify.cas.pki import client_key_hash
from enclavify.errors import CasError
from enclavify.secrets.certificates import private_key_pem, self_signed_certificate


def default_identity_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "enclavify" / "identity.pem"


def load_or_create_identity(path: Path | None = None) -> Identity:
    """Return the identity stored at ``path``, creating the key and certificate on first use.

    Raises:
        CasError: the file is unreadable, is accessible by group or others, or holds no
            private key and certificate.
    """
    path = path or default_identity_path()
    # The file holds the private key that the CAS grants access to. Two commands creating
    # the identity at once must end up with the same one.
    try:
        data = atomic.read_or_create_private(path, _new_identity_pem, what="the client identity")
    except atomic.InsecureModeError as error:
        raise CasError(str(error)) from None
    except OSError as error:
        raise CasError(f"cannot read the client identity {path}: {error}") from error
    if b"PRIVATE KEY-----" not in data or b"BEGIN CERTIFICATE-----" not in data:
        raise CasError(f"{path}: expected a PEM private key and certificate")
    return Identity(str(path))


def identity_key_hash(identity: Identity) -> str:
    """Return the client key hash the CAS will see for ``identity`` (hex SHA-256 of its SPKI)."""
    data = Path(identity.path).read_bytes()
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise CasError(f"{identity.path}: no readable certificate: {error}") from error
    return client_key_hash(certificate.public_bytes(serialization.Encoding.DER))


def _new_identity_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = self_signed_certificate(
        key, "enclavify client", now=datetime.datetime.now(datetime.UTC),
        valid_for=datetime.timedelta(days=3650),
    )
    return private_key_pem(key) + certificate.public_bytes(serialization.Encoding.PEM)
