"""Report data: the 64 bytes of evidence that tie it to one attestation exchange.

The launcher asks the CAS for a nonce, makes an ephemeral X25519 key pair and puts
``SHA-512(nonce || public_key)`` into the report data of its evidence. The CAS recomputes it,
so evidence answers exactly one challenge and the configuration can only be opened with the
private key that never left the launcher.

This module is carried into confidential images: standard library and Python 3.8 syntax only.
"""

from __future__ import annotations

import hashlib

# SGX, TDX and SEV-SNP all carry 64 bytes of report data, the size of a SHA-512 digest.
SIZE = 64


def bind(nonce: bytes, public_key: bytes) -> bytes:
    """Return the report data binding ``nonce`` and ``public_key``: SHA-512(nonce || public_key).

    Raises:
        ValueError: if either argument is empty, since an empty nonce or key binds nothing.
    """
    if not nonce:
        raise ValueError("nonce must not be empty")
    if not public_key:
        raise ValueError("public key must not be empty")
    return hashlib.sha512(nonce + public_key).digest()
