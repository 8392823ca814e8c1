"""Client identity files: created private, rejected when others can read them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from enclavify.cas.identity import load_or_create_identity
from enclavify.errors import CasError


def test_new_identity_is_private(tmp_path: Path) -> None:
    path = tmp_path / "config" / "identity.pem"

    identity = load_or_create_identity(path)

    assert identity.path == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_identity(path).path == str(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_identity_readable_by_others_rejected(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.pem"
    load_or_create_identity(path)
    path.chmod(mode)

    with pytest.raises(CasError) as excinfo:
        load_or_create_identity(path)

    message = str(excinfo.value)
    assert str(path) in message
    assert "chmod 600" in message
    assert "PRIVATE KEY" not in message
