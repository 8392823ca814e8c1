"""Where a CAS keeps its files, and the names of those files."""

from __future__ import annotations

import os
from pathlib import Path

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
