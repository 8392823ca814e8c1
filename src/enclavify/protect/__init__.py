"""The protected file system: seal directory trees into encrypted objects and an fspf, verify
and restore them.

The format is described in :mod:`enclavify.protect.format`. :mod:`.seal` runs at conversion
time. :mod:`.format` and :mod:`.unseal` are carried into confidential images and use only the
standard library and :mod:`enclavify.crypto`, so this package imports :mod:`.seal` only when
one of its names is first used, and the launcher never loads it.
"""

from __future__ import annotations

import importlib

from enclavify.protect.format import (
    CHUNK_SIZE,
    FORMAT_VERSION,
    Entry,
    Manifest,
    chunk_aad,
    chunk_nonce,
    sealed_size,
)
from enclavify.protect.unseal import open_fspf, unseal_tree

# typing is imported for the type checker only: it costs about 2 ms at every container start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from enclavify.protect.seal import SealedVolume, Sealer, seal_tree

_SEAL_NAMES = ("SealedVolume", "Sealer", "seal_tree")

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


def __getattr__(name: str) -> Any:
    if name in _SEAL_NAMES:
        return getattr(importlib.import_module("enclavify.protect.seal"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
