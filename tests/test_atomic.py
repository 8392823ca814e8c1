"""Atomic writes: the target is the old file or the whole new one, never a part."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from enclavify import atomic


def test_write_replaces_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    atomic.write_bytes(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["key.pem"]


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "policy.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic.writer(target) as stream:
        stream.write(b"half of the new")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["policy.json"]


def test_temporary_file_is_private_while_written(tmp_path: Path) -> None:
    target = tmp_path / "ca.pem"
    with atomic.writer(target, mode=0o644) as stream:
        (temporary,) = (name for name in os.listdir(tmp_path) if name != "ca.pem")
        assert stat.S_IMODE(os.stat(tmp_path / temporary).st_mode) == 0o600
        stream.write(b"certificate")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_no_replace_keeps_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "master.key"
    atomic.write_bytes(target, b"first", mode=0o600, replace=False)
    with pytest.raises(FileExistsError):
        atomic.write_bytes(target, b"second", mode=0o600, replace=False)
    assert target.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["master.key"]


@pytest.mark.parametrize("sync", [True, False])
def test_writer_syncs_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: bool
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append("directory" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "image.tar"
    target.write_bytes(b"old")
    with atomic.writer(target, sync=sync) as stream:
        stream.write(b"new")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["image.tar"]
    assert synced == (["file", "directory"] if sync else [])
