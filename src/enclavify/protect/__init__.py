"""The protected file system: seal directory trees into encrypted objects and an fspf, verify
and restore them.

The format is described in :mod:`enclavify.protect.format`. :mod:`.seal` runs at conversion
time; :mod:`.format` and :mod:`.unseal` are carried into confidential images and use only the
standard library and :mod:`enclavify.crypto`.
"""

from __future__ import annotations

from enclavify.protect.format import (
    CHUNK_SIZE,
    FORMAT_VERSION,
    Entry,
    Manifest,
    chunk_aad,
    chunk_nonce,
    sealed_size,
)
from enclavify.protect.seal import SealedVolume, Sealer, seal_tree
from enclavify.protect.unseal import open_fspf, unseal_tree

__all__ = [
    "CHUNK_SIZE",
    "FORMAT_VERSION",
    "Entry",
    "Manifest",
    "SealedVolume",
    "Sealer",
    "chunk_aad",
    "chunk_nonce",
    "open_fspf",
    "seal_tree",
    "sealed_size",
    "unseal_tree",
]
