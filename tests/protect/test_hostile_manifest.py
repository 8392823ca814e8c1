"""Unsealing never writes outside the target root, even for an authentic but hostile fspf.

Anyone with the volume key can write any manifest. These fspfs are sealed by hand, and the
unsealer must still keep every write below the target root and follow no symlink there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from enclavify.errors import IntegrityError, ProtectError
from enclavify.protect import CHUNK_SIZE, FORMAT_VERSION, open_fspf, unseal_tree
from enclavify.protect.format import TAG_SIZE
from tests.protect.trees import seal_manifest, seal_object

KEY = bytes(range(32))


def directory(path: str) -> dict[str, Any]:
    return {"type": "dir", "path": path, "mode": 0o755, "uid": 0, "gid": 0, "mtime": 1.0}


def symlink(path: str, target: str) -> dict[str, Any]:
    return {
        "type": "symlink",
        "path": path,
        "target": target,
        "mode": 0o777,
        "uid": 0,
        "gid": 0,
        "mtime": 1.0,
    }


class Volume:
    """A sealed directory built from hand-written manifest entries."""

    def __init__(self, root: Path) -> None:
        self.sealed = root / "sealed"
        self.sealed.mkdir(parents=True)
        # Sealed objects by file key: the pack contains them in the order of the file entries.
        self.objects: dict[str, bytes] = {}

    def file(self, path: str, content: bytes) -> dict[str, Any]:
        key = os.urandom(32)
        file_id = os.urandom(16)
        self.objects[key.hex()] = seal_object(key, file_id, content)
        return {
            "type": "file",
            "path": path,
            "mode": 0o644,
            "uid": 0,
            "gid": 0,
            "mtime": 1.0,
            "size": len(content),
            "key": key.hex(),
            "file_id": file_id.hex(),
        }

    def seal(self, entries: list[dict[str, Any]], regions: list[str] | None = None) -> bytes:
        document = {
            "format": FORMAT_VERSION,
            "chunk_size": CHUNK_SIZE,
            "regions": regions or ["/app"],
            "entries": entries,
        }
        fspf = seal_manifest(document, KEY)
        (self.sealed / "fspf").write_bytes(fspf)
        pack = b"".join(
            self.objects[entry["key"]]
            for entry in entries
            if entry.get("type") == "file" and entry.get("key") in self.objects
        )
        (self.sealed / "pack").write_bytes(pack)
        return fspf[-TAG_SIZE:]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the target that nothing may touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "keep").write_bytes(b"original")
    return path


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "target"
    path.mkdir()
    return path


def assert_untouched(outside: Path) -> None:
    assert sorted(item.name for item in outside.iterdir()) == ["keep"]
    assert (outside / "keep").read_bytes() == b"original"


def test_write_through_absolute_symlink_entry_is_rejected(
    tmp_path: Path, target: Path, outside: Path
) -> None:
    volume = Volume(tmp_path)
    tag = volume.seal(
        [
            directory("/app"),
            symlink("/app/link", str(outside)),
            volume.file("/app/link/evil", b"pwned"),
        ]
    )

    with pytest.raises(ProtectError, match="'/app/link' is a symlink or not a directory"):
        unseal_tree(volume.sealed, KEY, tag, target)
    assert_untouched(outside)


def test_write_through_relative_symlink_entry_is_rejected(
    tmp_path: Path, target: Path, outside: Path
) -> None:
    volume = Volume(tmp_path)
    tag = volume.seal(
        [
            symlink("/app/up", "../../outside"),
            directory("/app/up/made"),
            volume.file("/app/up/keep", b"pwned"),
        ]
    )

    with pytest.raises(ProtectError, match="symlink or not a directory"):
        unseal_tree(volume.sealed, KEY, tag, target)
    assert_untouched(outside)


def test_symlink_already_in_target_is_not_followed(
    tmp_path: Path, target: Path, outside: Path
) -> None:
    (target / "app").symlink_to(outside)
    volume = Volume(tmp_path)
    tag = volume.seal([directory("/app"), volume.file("/app/keep", b"pwned")])

    with pytest.raises(ProtectError, match="'/app' is a symlink or not a directory"):
        unseal_tree(volume.sealed, KEY, tag, target)
    assert_untouched(outside)


def test_symlink_above_region_is_not_followed(tmp_path: Path, target: Path, outside: Path) -> None:
    (target / "srv").symlink_to(outside)
    volume = Volume(tmp_path)
    tag = volume.seal([directory("/srv/data")], regions=["/srv/data"])

    with pytest.raises(ProtectError, match="'/srv' is a symlink or not a directory"):
        unseal_tree(volume.sealed, KEY, tag, target)
    assert_untouched(outside)


def test_symlink_at_file_path_is_replaced_not_followed(
    tmp_path: Path, target: Path, outside: Path
) -> None:
    (target / "app").mkdir()
    (target / "app" / "f").symlink_to(outside / "keep")
    volume = Volume(tmp_path)
    tag = volume.seal([volume.file("/app/f", b"protected")])

    unseal_tree(volume.sealed, KEY, tag, target)

    assert not (target / "app" / "f").is_symlink()
    assert (target / "app" / "f").read_bytes() == b"protected"
    assert_untouched(outside)


@pytest.mark.parametrize(
    "path",
    ["/app/../outside/x", "app/x", "/app/./x", "/app//x", "/app/x/", "/app/x\x00y"],
)
def test_entry_path_not_absolute_and_normalized_is_rejected(
    tmp_path: Path, target: Path, path: str
) -> None:
    volume = Volume(tmp_path)
    tag = volume.seal([directory("/app"), volume.file(path, b"x")])

    with pytest.raises(ProtectError, match=r"absolute|normalized|NUL"):
        unseal_tree(volume.sealed, KEY, tag, target)
    assert list(target.iterdir()) == []


def test_entry_outside_regions_is_rejected(tmp_path: Path, target: Path) -> None:
    volume = Volume(tmp_path)
    tag = volume.seal([volume.file("/etc/cron.d/evil", b"* * * * * root sh")])

    with pytest.raises(ProtectError, match=r"'/etc/cron\.d/evil' lies outside every protected"):
        unseal_tree(volume.sealed, KEY, tag, target)
    assert list(target.iterdir()) == []


def test_size_past_pack_end_is_rejected(tmp_path: Path, target: Path) -> None:
    # The manifest claims more than the pack holds; nothing may be read beyond its end.
    volume = Volume(tmp_path)
    entry = volume.file("/app/f", b"abc")
    entry["size"] = 10 * CHUNK_SIZE
    tag = volume.seal([volume.file("/app/e", b"e"), entry])

    with pytest.raises(IntegrityError, match="protected file '/app/f' failed verification"):
        unseal_tree(volume.sealed, KEY, tag, target)
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("link_target", ["/etc/shadow", "/app/l", "/app/d"])
def test_hardlink_not_to_an_earlier_file_is_rejected(
    tmp_path: Path, target: Path, link_target: str
) -> None:
    volume = Volume(tmp_path)
    tag = volume.seal(
        [
            directory("/app/d"),
            symlink("/app/l", "d"),
            {"type": "hardlink", "path": "/app/h", "target": link_target},
        ]
    )

    with pytest.raises(ProtectError, match="hardlink '/app/h' does not name an earlier file"):
        unseal_tree(volume.sealed, KEY, tag, target)


def test_duplicate_entry_is_rejected(tmp_path: Path, target: Path) -> None:
    volume = Volume(tmp_path)
    tag = volume.seal([volume.file("/app/f", b"a"), symlink("/app/f", "/etc/passwd")])

    with pytest.raises(ProtectError, match="'/app/f' occurs twice"):
        unseal_tree(volume.sealed, KEY, tag, target)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mode", 0o100644, "is not permission bits"),
        ("mtime", float("inf"), "not a finite number"),
        ("mtime", float("nan"), "not a finite number"),
        ("type", 4, "unknown type 4"),
        ("target", "x", "file '/app/f' has a target"),
        ("key", "00", "runs past the end of the manifest"),
    ],
)
def test_malformed_entry_is_rejected(
    tmp_path: Path, target: Path, field: str, value: object, message: str
) -> None:
    volume = Volume(tmp_path)
    entry = volume.file("/app/f", b"a")
    entry[field] = value
    tag = volume.seal([entry])

    with pytest.raises(ProtectError, match=message):
        open_fspf((volume.sealed / "fspf").read_bytes(), KEY, tag)
