"""Imported secrets whose material is malformed fail with a SecretError naming the secret."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclavify.errors import SecretError
from enclavify.policy import parse_session
from enclavify.secrets import SecretValue, generate_secrets
from enclavify.secrets.certificates import private_key_pem

ED25519_OID = bytes.fromhex("06032b6570")
UNKNOWN_OID = bytes.fromhex("06032b6572")  # 1.3.101.114, no key type the library knows


def _unknown_algorithm_key() -> tuple[str, str]:
    """Return a PKCS #8 PEM key of an algorithm the library does not support, and its body."""
    der = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert ED25519_OID in der
    body = base64.b64encode(der.replace(ED25519_OID, UNKNOWN_OID)).decode("ascii")
    return f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n", body


def _generation_error(text: str, imported: SecretValue) -> str:
    """Return the SecretError message of generating ``text``, each import giving ``imported``."""
    with pytest.raises(SecretError) as info:
        generate_secrets(parse_session(text), {}, lambda session, secret: imported)
    return str(info.value)


def test_public_key_of_unsupported_algorithm_is_a_secret_error() -> None:
    pem, body = _unknown_algorithm_key()
    value = SecretValue("private-key", {"key": pem}, "x")

    with pytest.raises(SecretError) as info:
        value.public_value()
    assert "unsupported key type" in str(info.value)
    assert body not in str(info.value)

    with pytest.raises(SecretError):
        value.render("publickey")


def test_imported_key_of_unsupported_algorithm_names_the_secret() -> None:
    pem, body = _unknown_algorithm_key()
    text = """
name: ns/app
secrets:
  - name: shared_key
    kind: private-key
    import: {session: ns/keys, secret: key}
  - name: server
    kind: x509
    private_key: shared_key
"""
    imported = SecretValue("private-key", {"key": pem}, "x")

    message = _generation_error(text, imported)

    assert "'server'" in message
    assert "'shared_key'" in message
    assert body not in message


def test_imported_issuer_with_malformed_certificate_names_the_secret() -> None:
    key = private_key_pem(ed25519.Ed25519PrivateKey.generate()).decode("ascii")
    garbage = "c2VjcmV0LWNlcnRpZmljYXRl"
    cert = f"-----BEGIN CERTIFICATE-----\n{garbage}\n-----END CERTIFICATE-----\n"
    text = """
name: ns/app
secrets:
  - name: ca
    kind: x509-ca
    import: {session: ns/pki, secret: root}
  - name: server
    kind: x509
    issuer: ca
"""
    imported = SecretValue("x509-ca", {"cert": cert, "key": key, "chain": ""}, "x")

    message = _generation_error(text, imported)

    assert "'server'" in message
    assert "'ca'" in message
    assert garbage not in message
    assert "PRIVATE KEY" not in message
