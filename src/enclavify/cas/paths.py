"""Where a CAS keeps its files, and the names of those files."""

from __future__ import annotations

import os
from pathlib import Path

from enclavify.errors import UsageError

CA_CERT = "ca.pem"
DATABASE_FILE = "cas.db"


def default_data_dir() -> Path:
    """Return ``$ENCLAVIFY_CAS_DATA``, else ``enclavify/cas`` under ``$XDG_DATA_HOME``.

    ``$XDG_DATA_HOME`` defaults to ``~/.local/share``.
    """
    configured = os.environ.get("ENCLAVIFY_CAS_DATA")
    if configured:
        return Path(configured)
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "enclavify" / "cas"


def database_url(data_dir: Path, db: str | None) -> str:
    """Return ``db``, or the SQLite file in ``data_dir`` when no database URL is given."""
    return db or str(data_dir / DATABASE_FILE)


def pinned_ca_certificate(path: Path | None = None) -> bytes:
    """Return the CAS CA certificate a client pins, as PEM.

    The certificate comes from ``path``, else from ``$ENCLAVIFY_CAS_CERT``, else from the local
    CAS's data directory (:func:`default_data_dir`).

    Raises:
        UsageError: none of them is given or present, or the file cannot be read.
    """
    if path is None and os.environ.get("ENCLAVIFY_CAS_CERT"):
        path = Path(os.environ["ENCLAVIFY_CAS_CERT"])
    if path is None:
        local = default_data_dir() / CA_CERT
        if not local.exists():
            raise UsageError(
                "no CAS certificate: pass --cas-cert FILE or set $ENCLAVIFY_CAS_CERT (the "
                "output of 'enclavify cas show-certificate'), or start a local CAS with "
                "'enclavify cas serve'"
            )
        path = local
    try:
        return path.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read the CAS certificate {str(path)!r}: {error}") from error
