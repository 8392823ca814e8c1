"""The measurement: size parsing, the runtime tree hash and what changes the result."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from enclavify.attest import measurement
from enclavify.attest.measurement import (
    GIB,
    KIB,
    MIB,
    PROTECTED_BINARY,
    RootFiles,
    binary_digest,
    compute,
    parse_size,
    runtime_digest,
)
from enclavify.errors import UsageError

BASE: dict[str, Any] = {
    "runtime_digest": "a" * 64,
    "binary": "/usr/bin/python3",
    "binary_digest": "b" * 64,
    "fspf_digest": "c" * 64,
    "heap": GIB,
    "stack": 4 * MIB,
    "dlopen": 2,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1G", GIB),
        ("4M", 4 * MIB),
        ("4m", 4 * MIB),
        ("32k", 32 * KIB),
        ("32K", 32 * KIB),
        ("60g", 60 * GIB),
        ("65536", 65536),
    ],
)
def test_parse_size_suffixes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "1.5G", "1T", "-4M", "4 MB", "0x10"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(UsageError, match="invalid heap"):
        parse_size(text, name="heap")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("heap", 8 * MIB - 1, "heap"),
        ("heap", 60 * GIB + 1, "heap"),
        ("stack", 32 * KIB - 1, "stack"),
        ("stack", 8 * MIB + 1, "stack"),
        ("dlopen", 3, "dlopen"),
        ("dlopen", -1, "dlopen"),
    ],
)
def test_compute_rejects_out_of_range(field: str, value: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        compute(**dict(BASE, **{field: value}))


def test_compute_accepts_range_limits() -> None:
    for heap, stack in ((8 * MIB, 32 * KIB), (60 * GIB, 8 * MIB)):
        assert len(compute(**dict(BASE, heap=heap, stack=stack))) == 64


def test_compute_is_stable() -> None:
    assert compute(**BASE) == compute(**dict(BASE))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("heap", 2 * GIB),
        ("stack", 8 * MIB),
        ("dlopen", 0),
        ("binary", "/usr/bin/python3.11"),
        ("binary_digest", "d" * 64),
        ("runtime_digest", "e" * 64),
        ("fspf_digest", None),
    ],
)
def test_compute_changes_with_each_field(field: str, value: object) -> None:
    assert compute(**dict(BASE, **{field: value})) != compute(**BASE)


def _tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python3").write_bytes(b"\x7fELF interpreter")
    (root / "bin" / "python3").chmod(0o755)
    (root / "runtime.json").write_text('{"heap": 1}')
    (root / "lib").mkdir()
    (root / "lib" / "libc.so.6").write_bytes(b"libc")
    os.symlink("libc.so.6", root / "lib" / "libc.so")
    return root


def test_runtime_digest_same_for_equal_trees(tmp_path: Path) -> None:
    first = _tree(tmp_path / "one")
    second = _tree(tmp_path / "two")
    os.utime(second / "lib" / "libc.so.6", (0, 0))
    assert runtime_digest(first) == runtime_digest(second)


def test_runtime_digest_covers_content_mode_links_and_config(tmp_path: Path) -> None:
    root = _tree(tmp_path / "rt")
    original = runtime_digest(root)

    (root / "lib" / "libc.so.6").write_bytes(b"libC")
    changed_content = runtime_digest(root)
    (root / "lib" / "libc.so.6").write_bytes(b"libc")
    assert runtime_digest(root) == original

    (root / "bin" / "python3").chmod(0o700)
    changed_mode = runtime_digest(root)
    (root / "bin" / "python3").chmod(0o755)

    (root / "lib" / "libc.so").unlink()
    os.symlink("libm.so.6", root / "lib" / "libc.so")
    changed_link = runtime_digest(root)
    (root / "lib" / "libc.so").unlink()
    os.symlink("libc.so.6", root / "lib" / "libc.so")

    (root / "runtime.json").write_text('{"heap": 2}')
    changed_config = runtime_digest(root)
    (root / "runtime.json").write_text('{"heap": 1}')

    (root / "extra").write_bytes(b"")
    changed_added = runtime_digest(root)

    for changed in (changed_content, changed_mode, changed_link, changed_config, changed_added):
        assert changed != original


def _image(root: Path) -> RootFiles:
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "python3.11").write_bytes(b"python")
    os.symlink("python3.11", root / "usr" / "bin" / "python3")
    (root / "usr" / "local" / "bin").mkdir(parents=True)
    os.symlink("/app/venv/python", root / "usr" / "local" / "bin" / "app-python")
    os.symlink("../../bin/python3", root / "usr" / "local" / "bin" / "relative")
    return RootFiles(root)


def test_binary_digest_follows_symlinks(tmp_path: Path) -> None:
    files = _image(tmp_path)
    direct = binary_digest(files, "/usr/bin/python3.11", ["/app"])
    assert binary_digest(files, "/usr/bin/python3", ["/app"]) == direct
    assert binary_digest(files, "/usr/local/bin/relative", ["/app"]) == direct
    assert direct != PROTECTED_BINARY


def test_binary_digest_in_region_is_protected(tmp_path: Path) -> None:
    files = _image(tmp_path)
    assert binary_digest(files, "/app/venv/python", ["/app"]) == PROTECTED_BINARY
    # The link is plain but points into an encrypted region.
    assert binary_digest(files, "/usr/local/bin/app-python", ["/app"]) == PROTECTED_BINARY
    assert binary_digest(files, "/usr/bin/python3", ["/usr/bin"]) == PROTECTED_BINARY


def test_binary_digest_missing_binary(tmp_path: Path) -> None:
    files = _image(tmp_path)
    with pytest.raises(UsageError, match="not found"):
        binary_digest(files, "/usr/bin/python4", [])
    with pytest.raises(UsageError, match="absolute"):
        binary_digest(files, "python3", [])
    with pytest.raises(UsageError, match="not a regular file"):
        binary_digest(files, "/usr/bin", [])


def test_root_files_never_leave_root(tmp_path: Path) -> None:
    files = _image(tmp_path / "root")
    (tmp_path / "outside").write_text("secret")
    os.symlink("../../../outside", tmp_path / "root" / "usr" / "bin" / "escape")
    assert files.resolve("/usr/bin/escape") is None
    assert files.resolve("/../../outside") is None
    assert measurement.in_regions("/app", ["/app/"])
    assert not measurement.in_regions("/application", ["/app"])
