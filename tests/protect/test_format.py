"""The sealed format matches its specification, and the Sealer rejects bad input."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclavify.errors import ProtectError
from enclavify.protect import (
    CHUNK_SIZE,
    FORMAT_VERSION,
    Sealer,
    open_fspf,
    seal_tree,
    sealed_size,
)
from enclavify.protect.format import TAG_SIZE
from tests.protect.trees import seal_manifest, seal_object


class Counter:
    """Deterministic stand-in for os.urandom."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, size: int) -> bytes:
        self.calls += 1
        return bytes([self.calls % 256]) * size


class Pack:
    """An in-memory pack for Sealer."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    def object_at(self, offset: int, size: int) -> bytes:
        """Return the object of a file of ``size`` bytes at ``offset``."""
        return bytes(self.data[offset : offset + sealed_size(size)])


def seal_example(randbytes: Counter | None = None) -> tuple[Pack, Sealer]:
    pack = Pack()
    sealer = Sealer(["/app"], pack.write, randbytes=randbytes or os.urandom)
    sealer.add_directory("/app", mode=0o40755, uid=0, gid=0, mtime=1.5)
    content = bytes(range(256)) * 700  # 179200 bytes: 2 full chunks and a partial one
    sealer.add_file(
        "/app/x.py", io.BytesIO(content), len(content), mode=0o100644, uid=1, gid=2, mtime=3.25
    )
    sealer.add_file("/app/empty", io.BytesIO(b""), 0, mode=0o600, uid=0, gid=0, mtime=0.0)
    sealer.add_symlink("/app/l", "x.py", uid=0, gid=0, mtime=4.0)
    sealer.add_hardlink("/app/h", "/app/x.py")
    return pack, sealer


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, 16),
        (1, 17),
        (CHUNK_SIZE, CHUNK_SIZE + 16),
        (CHUNK_SIZE + 1, CHUNK_SIZE + 1 + 32),
        (10 * CHUNK_SIZE, 10 * CHUNK_SIZE + 160),
    ],
)
def test_sealed_size_follows_chunk_count(size: int, expected: int) -> None:
    assert sealed_size(size) == expected


def test_objects_decrypt_as_documented() -> None:
    pack, sealer = seal_example()
    volume = sealer.finish()

    # Decrypt the fspf by hand: header, 12-byte nonce, ciphertext with the header as AAD.
    assert volume.fspf.startswith(b"ENCLAVIFY-FSPF\x00\x03")
    nonce = volume.fspf[16:28]
    plaintext = AESGCM(volume.key).decrypt(nonce, volume.fspf[28:], volume.fspf[:16])
    assert volume.tag == volume.fspf[-16:]
    document = decode_manifest(plaintext)
    assert list(document) == sorted(document)
    assert document["format"] == FORMAT_VERSION
    assert document["chunk_size"] == CHUNK_SIZE
    assert document["regions"] == ["/app"]
    entries = {entry["path"]: entry for entry in document["entries"]}
    assert entries["/app"] == {
        "type": "dir",
        "path": "/app",
        "target": "",
        "mode": 0o755,
        "uid": 0,
        "gid": 0,
        "mtime": 1.5,
        "size": 0,
    }
    assert entries["/app/h"] == {
        "type": "hardlink", "path": "/app/h", "target": "/app/x.py",
        "mode": 0, "uid": 0, "gid": 0, "mtime": 0.0, "size": 0,
    }
    assert entries["/app/l"]["target"] == "x.py"

    # Re-seal each file independently of the code under test and compare byte for byte: the
    # pack is the objects in the order of the file entries, and nothing else.
    content = bytes(range(256)) * 700
    expected_pack = b""
    for entry in document["entries"]:
        if entry["type"] != "file":
            continue
        data = {"/app/x.py": content, "/app/empty": b""}[entry["path"]]
        assert entry["mode"] == (0o644 if data else 0o600)
        assert entry["size"] == len(data)
        expected = seal_object(bytes.fromhex(entry["key"]), bytes.fromhex(entry["file_id"]), data)
        assert len(expected) == sealed_size(len(data))
        expected_pack += expected
    assert bytes(pack.data) == expected_pack
    assert sealer.pack_size == len(expected_pack)


def decode_manifest(plaintext: bytes) -> dict[str, Any]:
    """Read a manifest as the format describes it, independently of the code under test."""
    line, _, rest = plaintext.partition(b"\n")
    document = json.loads(line)
    records = struct.Struct("<HHIIdQII")
    names = memoryview(rest)[document["entries"] * records.size :]
    entries = []
    for fields in records.iter_unpack(rest[: document["entries"] * records.size]):
        kind, mode, uid, gid, mtime, size, path_size, target_size = fields
        entry = {
            "type": ("dir", "file", "symlink", "hardlink")[kind],
            "path": bytes(names[:path_size]).decode(),
            "target": bytes(names[path_size : path_size + target_size]).decode(),
            "mode": mode, "uid": uid, "gid": gid, "mtime": mtime, "size": size,
        }
        names = names[path_size + target_size :]
        if entry["type"] == "file":
            entry["key"], entry["file_id"] = bytes(names[:32]).hex(), bytes(names[32:48]).hex()
            names = names[48:]
        entries.append(entry)
    assert not names, "bytes after the last entry"
    return {**document, "entries": entries}


def test_sealing_is_deterministic_with_injected_randomness() -> None:
    first_pack, first = seal_example(Counter())
    second_pack, second = seal_example(Counter())

    assert first.finish() == second.finish()
    assert first_pack.data == second_pack.data


def test_open_fspf_returns_entries_in_sealing_order() -> None:
    _, sealer = seal_example()
    volume = sealer.finish()

    manifest = open_fspf(volume.fspf, volume.key, volume.tag)

    assert manifest.regions == ("/app",)
    assert [entry.path for entry in manifest.entries] == [
        "/app",
        "/app/x.py",
        "/app/empty",
        "/app/l",
        "/app/h",
    ]
    assert manifest.entries[1].mtime == 3.25
    assert (manifest.entries[1].uid, manifest.entries[1].gid) == (1, 2)


def test_repr_shows_no_key_material() -> None:
    _, sealer = seal_example()
    volume = sealer.finish()
    manifest = open_fspf(volume.fspf, volume.key, volume.tag)
    file_entry = manifest.entries[1]

    assert file_entry.key
    for text in (repr(volume), repr(manifest), repr(file_entry)):
        assert volume.key.hex() not in text
        assert repr(volume.key) not in text
        assert file_entry.key.hex() not in text
        assert repr(file_entry.key) not in text


@pytest.mark.parametrize("version", [FORMAT_VERSION - 1, FORMAT_VERSION + 1])
def test_other_header_version_is_rejected(version: int) -> None:
    _, sealer = seal_example()
    volume = sealer.finish()
    other = volume.fspf[:15] + bytes([version]) + volume.fspf[16:]

    with pytest.raises(ProtectError, match=f"unsupported fspf format version {version}.*again"):
        open_fspf(other, volume.key, volume.tag)


def test_unknown_manifest_version_is_rejected() -> None:
    key = os.urandom(32)
    document = {"format": 4, "chunk_size": CHUNK_SIZE, "regions": [], "entries": []}
    fspf = seal_manifest(document, key)

    with pytest.raises(ProtectError, match=r"^'vol/fspf': unsupported fspf format version 4"):
        open_fspf(fspf, key, fspf[-TAG_SIZE:], name="vol/fspf")


def test_file_that_is_not_an_fspf_is_rejected() -> None:
    with pytest.raises(ProtectError, match=r"^'vol/fspf': not an enclavify fspf"):
        open_fspf(b"PK\x03\x04" + bytes(100), os.urandom(32), os.urandom(16), name="vol/fspf")


def test_entry_outside_regions_is_rejected_when_sealing() -> None:
    sealer = Sealer(["/app"], Pack().write)

    with pytest.raises(ProtectError, match="'/etc/passwd' lies outside every protected region"):
        sealer.add_file("/etc/passwd", io.BytesIO(b"x"), 1, mode=0o644, uid=0, gid=0, mtime=0)
    with pytest.raises(ProtectError, match="'/application'"):
        sealer.add_directory("/application", mode=0o755, uid=0, gid=0, mtime=0)


@pytest.mark.parametrize("path", ["app/x", "/app/../etc/x", "/app//x", "/app/./x", "/app/x/"])
def test_unnormalized_path_is_rejected_when_sealing(path: str) -> None:
    sealer = Sealer(["/app"], Pack().write)

    with pytest.raises(ProtectError, match=r"absolute|normalized"):
        sealer.add_directory(path, mode=0o755, uid=0, gid=0, mtime=0)


def test_duplicate_path_is_rejected() -> None:
    sealer = Sealer(["/app"], Pack().write)
    sealer.add_directory("/app", mode=0o755, uid=0, gid=0, mtime=0)

    with pytest.raises(ProtectError, match="'/app' was added twice"):
        sealer.add_symlink("/app", "x", uid=0, gid=0, mtime=0)


def test_stream_shorter_than_size_is_rejected() -> None:
    sealer = Sealer(["/app"], Pack().write)

    with pytest.raises(ProtectError, match="'/app/f' ended after 3 bytes, expected 100000"):
        sealer.add_file("/app/f", io.BytesIO(b"abc"), 100000, mode=0o644, uid=0, gid=0, mtime=0)


def test_stream_longer_than_size_is_rejected() -> None:
    sealer = Sealer(["/app"], Pack().write)

    with pytest.raises(ProtectError, match="longer than the expected 2 bytes"):
        sealer.add_file("/app/f", io.BytesIO(b"abc"), 2, mode=0o644, uid=0, gid=0, mtime=0)


def test_short_reads_from_stream_are_completed() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = data

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            step = 7 if size < 0 else min(7, size)
            piece, self.data = self.data[:step], self.data[step:]
            return piece

    pack = Pack()
    sealer = Sealer(["/app"], pack.write)
    data = os.urandom(CHUNK_SIZE + 50)

    sealer.add_file("/app/f", Trickle(data), len(data), mode=0o644, uid=0, gid=0, mtime=0)  # type: ignore[arg-type]

    manifest = open_fspf(*_fspf_key_tag(sealer))
    entry = manifest.entries[0]
    assert pack.object_at(entry.offset, entry.size) == seal_object(entry.key, entry.file_id, data)


def _fspf_key_tag(sealer: Sealer) -> tuple[bytes, bytes, bytes]:
    volume = sealer.finish()
    return volume.fspf, volume.key, volume.tag


def test_unfinished_object_blocks_sealer() -> None:
    sealer = Sealer(["/app"])
    data = os.urandom(3 * CHUNK_SIZE)
    chunks = sealer.seal_file(
        "/app/f", io.BytesIO(data), len(data), mode=0o644, uid=0, gid=0, mtime=0
    )
    next(chunks)

    # The next object's offset would be wrong, and the fspf would lack the file.
    with pytest.raises(RuntimeError, match="object of '/app/f' was not read to its end"):
        sealer.add_directory("/app/d", mode=0o755, uid=0, gid=0, mtime=0)
    with pytest.raises(RuntimeError, match="not read to its end"):
        sealer.finish()


def test_pulled_and_pushed_packs_match() -> None:
    data = os.urandom(2 * CHUNK_SIZE + 5)
    pushed_pack = Pack()
    pushed = Sealer(["/app"], pushed_pack.write, randbytes=Counter())
    pulled = Sealer(["/app"], randbytes=Counter())

    for name in ("a", "b"):
        pushed.add_file(
            f"/app/{name}", io.BytesIO(data), len(data), mode=0o644, uid=0, gid=0, mtime=0
        )
    pulled_pack = b"".join(
        chunk
        for name in ("a", "b")
        for chunk in pulled.seal_file(
            f"/app/{name}", io.BytesIO(data), len(data), mode=0o644, uid=0, gid=0, mtime=0
        )
    )

    assert bytes(pushed_pack.data) == pulled_pack
    assert pushed.finish() == pulled.finish()
    assert pulled.pack_size == len(pulled_pack) == 2 * sealed_size(len(data))


def test_add_file_needs_a_pack_writer() -> None:
    with pytest.raises(RuntimeError, match="no pack writer"):
        Sealer(["/app"]).add_file(
            "/app/f", io.BytesIO(b"x"), 1, mode=0o644, uid=0, gid=0, mtime=0
        )


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"uid": -1}, "owner -1:0 out of range"),
        ({"gid": 1 << 32}, "out of range"),
        ({"mtime": float("nan")}, "mtime nan is not a finite number"),
        ({"mtime": float("inf")}, "not a finite number"),
    ],
)
def test_unrestorable_metadata_is_rejected_when_sealing(
    metadata: dict[str, float], message: str
) -> None:
    sealer = Sealer(["/app"], Pack().write)
    arguments = {"mode": 0o644, "uid": 0, "gid": 0, "mtime": 0.0, **metadata}

    with pytest.raises(ProtectError, match=message):
        sealer.add_file("/app/f", io.BytesIO(b""), 0, **arguments)  # type: ignore[arg-type]
    with pytest.raises(ProtectError, match=message):
        sealer.add_directory("/app", **arguments)  # type: ignore[arg-type]


def test_hardlink_to_unknown_file_is_rejected() -> None:
    sealer = Sealer(["/app"], Pack().write)
    sealer.add_directory("/app/d", mode=0o755, uid=0, gid=0, mtime=0)

    with pytest.raises(ProtectError, match="hardlink '/app/h' points to '/usr/bin/x'"):
        sealer.add_hardlink("/app/h", "/usr/bin/x")
    with pytest.raises(ProtectError, match="hardlink '/app/h2' points to '/app/d'"):
        sealer.add_hardlink("/app/h2", "/app/d")


def test_adding_after_finish_is_an_error() -> None:
    sealer = Sealer(["/app"], Pack().write)
    sealer.finish()

    with pytest.raises(RuntimeError, match="finish"):
        sealer.add_directory("/app", mode=0o755, uid=0, gid=0, mtime=0)
    with pytest.raises(RuntimeError, match="finish"):
        sealer.finish()


def test_special_file_is_rejected_by_seal_tree(tmp_path: Path) -> None:
    (tmp_path / "root" / "app").mkdir(parents=True)
    os.mkfifo(tmp_path / "root" / "app" / "pipe")

    with pytest.raises(ProtectError, match="'/app/pipe' is a special file"):
        seal_tree(tmp_path / "root", ["/app"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "root"]


def test_missing_region_is_rejected_by_seal_tree(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()

    with pytest.raises(ProtectError, match="region '/app' is not a directory"):
        seal_tree(tmp_path / "root", ["/app"], tmp_path / "out")


def test_region_that_is_a_symlink_is_rejected_by_seal_tree(tmp_path: Path) -> None:
    (tmp_path / "root" / "real").mkdir(parents=True)
    (tmp_path / "root" / "app").symlink_to("real")

    with pytest.raises(ProtectError, match="region '/app' is not a directory"):
        seal_tree(tmp_path / "root", ["/app"], tmp_path / "out")


def test_nested_regions_are_rejected_by_seal_tree(tmp_path: Path) -> None:
    (tmp_path / "root" / "app" / "lib").mkdir(parents=True)

    with pytest.raises(ProtectError, match="'/app/lib' lies inside region '/app'"):
        seal_tree(tmp_path / "root", ["/app", "/app/lib"], tmp_path / "out")


def test_existing_output_is_rejected_by_seal_tree(tmp_path: Path) -> None:
    (tmp_path / "root" / "app").mkdir(parents=True)
    (tmp_path / "out").mkdir()

    with pytest.raises(ProtectError, match="already exists"):
        seal_tree(tmp_path / "root", ["/app"], tmp_path / "out")
