"""Encryption at rest under the CAS master key.

Sessions (which hold fspf keys and tags) and generated secret values are stored sealed with
AES-256-GCM under a 32-byte master key. The key lives in a file (mode 0600) in the data
directory, or wherever ``$ENCLAVIFY_CAS_MASTER_KEY_FILE`` points, and never in the database:
a copy of the database alone reveals no key or secret. Several CAS processes sharing one
PostgreSQL database must be given the same master key file.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclavify import atomic, crypto
from enclavify.errors import CasError

MASTER_KEY_FILE = "master.key"
_FORMAT = b"\x01"


def master_key_path(data_dir: Path) -> Path:
    configured = os.environ.get("ENCLAVIFY_CAS_MASTER_KEY_FILE")
    return Path(configured) if configured else data_dir / MASTER_KEY_FILE


class MasterKey:
    """Seals and opens records bound to a context string (the associated data)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise CasError(f"the CAS master key must be 32 bytes, not {len(key)}")
        self._key = key
        self._aead = AESGCM(key)

    @classmethod
    def load_or_create(cls, path: Path) -> MasterKey:
        """Read the key from ``path``, making a random one (mode 0600) if the file is absent.

        Raises:
            CasError: the file is unreadable, has the wrong size or is readable by others.
        """
        # A second process starting at the same moment must not replace the key the first
        # one may already have sealed records under: the first key written wins.
        try:
            data = atomic.read_or_create_private(
                path, lambda: os.urandom(32), what="the CAS master key"
            )
        except atomic.InsecureModeError as error:
            raise CasError(str(error)) from None
        except OSError as error:
            raise CasError(f"cannot read the CAS master key {path}: {error}") from error
        return cls(data)

    def derive_key(self, info: bytes) -> bytes:
        """Return a 32-byte key for another purpose, named by ``info`` (HKDF-SHA256).

        Every CAS process given the same master key file derives the same key, and no use
        of a derived key can reveal the master key or a key derived for another purpose.
        """
        return crypto.hkdf_sha256(self._key, salt=b"", info=info)

    def seal(self, plaintext: bytes, context: str) -> str:
        nonce = os.urandom(12)
        ciphertext = self._aead.encrypt(nonce, plaintext, context.encode("utf-8"))
        return base64.b64encode(_FORMAT + nonce + ciphertext).decode("ascii")

    def open(self, sealed: str, context: str) -> bytes:
        """Return the plaintext of ``sealed``.

        Raises:
            CasError: the record was sealed under another key or context, or was altered.
        """
        try:
            data = base64.b64decode(sealed, validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if data[:1] != _FORMAT or len(data) < 29:
            raise CasError(f"stored record for {context!r} has an unknown format")
        try:
            return self._aead.decrypt(data[1:13], data[13:], context.encode("utf-8"))
        except InvalidTag as error:
            raise CasError(
                f"stored record for {context!r} failed authentication: wrong master key or"
                " altered database"
            ) from error
