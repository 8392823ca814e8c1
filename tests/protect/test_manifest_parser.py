"""The manifest parser: what it accepts equals what the sealer writes, and each fault is named.

parse_manifest makes cheap checks on each entry and builds the error message only when one
fails. These tests encode manifests with an encoder of their own (tests.protect.trees), so
that they can write what the sealer never would, and check both sides: valid entries come
back exactly, and each malformed one fails with a message that names it.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavify.errors import ProtectError
from enclavify.protect.format import (
    FORMAT_VERSION,
    Entry,
    Manifest,
    parse_manifest,
    sealed_size,
)
from tests.protect.trees import encode_manifest

REGIONS = ("/app", "/srv/data")
KEY = "ab" * 32
FILE_ID = "cd" * 16


def manifest(entries: list[Any], regions: tuple[str, ...] = REGIONS, **header: Any) -> bytes:
    document = {
        "format": FORMAT_VERSION,
        "chunk_size": 65536,
        "regions": list(regions),
        "entries": entries,
        **header,
    }
    return encode_manifest(document)


def good_file(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "type": "file",
        "path": "/app/f",
        "mode": 0o644,
        "uid": 1,
        "gid": 2,
        "mtime": 5.5,
        "size": 3,
        "key": KEY,
        "file_id": FILE_ID,
    }
    raw.update(changes)
    return raw


def directory(path: str = "/app/d", **changes: Any) -> dict[str, Any]:
    return {"type": "dir", "path": path, "mode": 0o755, "uid": 0, "gid": 0, "mtime": 1.0,
            **changes}


def symlink(path: str = "/app/l", target: str = "f", **changes: Any) -> dict[str, Any]:
    return {"type": "symlink", "path": path, "target": target, "mode": 0o777, "mtime": 2.0,
            **changes}


def hardlink(path: str = "/srv/data/h", target: str = "/app/f", **changes: Any) -> dict[str, Any]:
    return {"type": "hardlink", "path": path, "target": target, **changes}


def test_parsed_entries_equal_ordinary_entries() -> None:
    raw = [directory("/app"), good_file(), symlink(), hardlink()]

    entries = parse_manifest(manifest(raw)).entries

    expected = (
        Entry(type="dir", path="/app", mode=0o755, mtime=1.0),
        Entry(
            type="file",
            path="/app/f",
            mode=0o644,
            uid=1,
            gid=2,
            mtime=5.5,
            size=3,
            key=bytes.fromhex(KEY),
            file_id=bytes.fromhex(FILE_ID),
        ),
        Entry(type="symlink", path="/app/l", target="f", mode=0o777, mtime=2.0),
        Entry(type="hardlink", path="/srv/data/h", target="/app/f"),
    )
    assert entries == expected
    assert [hash(entry) for entry in entries] == [hash(entry) for entry in expected]
    assert [repr(entry) for entry in entries] == [repr(entry) for entry in expected]
    assert KEY not in repr(entries)


# Entries as the sealer makes them: unique normalized paths in the regions, names that are
# not UTF-8 included, and hardlinks to earlier files.
names = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
).filter(lambda name: name not in (".", "..")) | st.sampled_from(["\udcff", "a\udc80b"])


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    entries: list[Entry] = []
    files: list[str] = []
    paths: set[str] = set()
    for _ in range(draw(st.integers(0, 12))):
        path = f"{draw(st.sampled_from(REGIONS))}/{draw(names)}"
        if path in paths:
            continue
        paths.add(path)
        metadata = {
            "mode": draw(st.integers(0, 0o7777)),
            "uid": draw(st.integers(0, (1 << 32) - 1)),
            "gid": draw(st.integers(0, (1 << 32) - 1)),
            "mtime": draw(st.floats(allow_nan=False, allow_infinity=False)),
        }
        kind = draw(st.sampled_from(["dir", "file", "symlink", "hardlink"]))
        if kind == "hardlink" and files:
            entries.append(Entry(type="hardlink", path=path, target=draw(st.sampled_from(files))))
        elif kind == "symlink":
            entries.append(Entry(type="symlink", path=path, target=draw(names), **metadata))
        elif kind == "dir":
            entries.append(Entry(type="dir", path=path, **metadata))
        else:
            entries.append(Entry(
                type="file", path=path, size=draw(st.integers(0, 1 << 40)),
                key=draw(st.binary(min_size=32, max_size=32)),
                file_id=draw(st.binary(min_size=16, max_size=16)), **metadata,
            ))
            files.append(path)
    return Manifest(regions=REGIONS, entries=tuple(entries))


@settings(max_examples=200, deadline=None)
@given(manifests())
def test_what_the_sealer_writes_is_read_back(written: Manifest) -> None:
    document = {
        "format": FORMAT_VERSION,
        "chunk_size": written.chunk_size,
        "regions": list(written.regions),
        "entries": [
            {"type": entry.type, "path": entry.path, "target": entry.target, "mode": entry.mode,
             "uid": entry.uid, "gid": entry.gid, "mtime": entry.mtime, "size": entry.size,
             "key": entry.key.hex(), "file_id": entry.file_id.hex()}
            for entry in written.entries
        ],
    }
    encoded = written.to_bytes()

    # The code writes the layout the format describes, byte for byte.
    assert encoded == encode_manifest(document)
    parsed = parse_manifest(encoded)
    assert parsed.regions == written.regions
    offset = 0
    for read, entry in zip(parsed.entries, written.entries, strict=True):
        assert read.__dict__ == {**entry.__dict__, "offset": offset if entry.type == "file" else 0}
        if entry.type == "file":
            offset += sealed_size(entry.size)


def test_root_region_holds_every_path() -> None:
    raw = [directory("/"), good_file(path="/x")]

    entries = parse_manifest(manifest(raw, regions=("/",))).entries

    assert [entry.path for entry in entries] == ["/", "/x"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (good_file(path="/app//f"), "not normalized"),
        (good_file(path="/app/./f"), "not normalized"),
        (good_file(path="/app/f/.."), "not normalized"),
        (good_file(path="/app/f/"), "not normalized"),
        (good_file(path="app/f"), "not an absolute path"),
        (good_file(path="/app/f\x00"), "NUL"),
        (good_file(path="/application/f"), "outside every protected region"),
        (good_file(path="/srv"), "outside every protected region"),
        (good_file(mode=0o10000), "is not permission bits"),
        (good_file(mtime=math.inf), "not a finite number"),
        (good_file(mtime=-math.inf), "not a finite number"),
        (good_file(mtime=math.nan), "not a finite number"),
        (good_file(type=7), "'/app/f' has unknown type 7"),
        (good_file(target="x"), "file '/app/f' has a target"),
        (directory(size=1), "dir '/app/d' has a size"),
        (directory(target="x"), "dir '/app/d' has a target"),
        (directory(mode=0o17777), "is not permission bits"),
        (symlink(target=""), "symlink '/app/l' has an empty or NUL target"),
        (symlink(target="a\x00b"), "symlink '/app/l' has an empty or NUL target"),
        (symlink(size=4), "symlink '/app/l' has a size"),
        (symlink(mtime=math.nan), "not a finite number"),
    ],
)
def test_malformed_entry_is_named(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtectError, match=re.escape(message)):
        parse_manifest(manifest([entry]))


@pytest.mark.parametrize(
    ("link", "message"),
    [
        (hardlink(mode=0o644), "hardlink '/srv/data/h' has metadata of its own"),
        (hardlink(mtime=math.nan), "hardlink '/srv/data/h' has metadata of its own"),
        (hardlink(size=3), "hardlink '/srv/data/h' has metadata of its own"),
        (hardlink(target="/app/./f"), "hardlink target '/app/./f' is not normalized"),
        (hardlink(target="/app/l"), "hardlink '/srv/data/h' does not name an earlier file"),
        (hardlink(target="/app/g"), "hardlink '/srv/data/h' does not name an earlier file"),
    ],
)
def test_hardlink_needs_earlier_file(
    link: dict[str, Any], message: str
) -> None:
    raw = [good_file(), symlink(), link, good_file(path="/app/g")]

    with pytest.raises(ProtectError, match=re.escape(message)):
        parse_manifest(manifest(raw))


def test_duplicate_path_is_rejected() -> None:
    with pytest.raises(ProtectError, match="entry '/app/f' occurs twice"):
        parse_manifest(manifest([good_file(), symlink(path="/app/f")]))


@pytest.mark.parametrize(
    ("plaintext", "message"),
    [
        (b'{"format": 3}', "no header line"),
        (b'{"format": 3\n', "header is not JSON"),
        (b'{"format": NaN}\n', "header is not JSON"),
        (b"[3]\n", "header is not a JSON object"),
        (b"[" * 100_000 + b"\n", "header is not JSON"),
        (manifest([], format=2), "unsupported fspf format version 2"),
        (manifest([], chunk_size=16), "chunk size 16 out of range"),
        (manifest([], chunk_size=True), "'chunk_size' missing or not int"),
        (manifest([], regions=("app",)), "region 'app' is not an absolute path"),
        (manifest([], entry_count=-1), "the manifest has -1 entries"),
        (manifest([good_file()], entry_count=5), "ends within its 5 entry records"),
        (manifest([good_file()]) + b"x", "1 bytes follow the last entry"),
        (manifest([good_file()])[:-1], "entry 0 runs past the end of the manifest"),
    ],
)
def test_malformed_manifest_is_named(plaintext: bytes, message: str) -> None:
    with pytest.raises(ProtectError, match=re.escape(message)):
        parse_manifest(plaintext)


def test_regions_must_be_a_list() -> None:
    plaintext = manifest([]).replace(b'"regions":["/app","/srv/data"]', b'"regions":"/app"')

    with pytest.raises(ProtectError, match="'regions' is not a list"):
        parse_manifest(plaintext)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_manifest_fails_only_with_protect_error(data: st.DataObject) -> None:
    # The fspf is authenticated, but anyone with the volume key can write any bytes.
    plaintext = bytearray(manifest([directory(), good_file(), symlink(), hardlink()]))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(plaintext) - 1))
        plaintext[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(plaintext)))

    with contextlib.suppress(ProtectError):
        parse_manifest(bytes(plaintext[:cut]))


def test_objects_follow_each_other_in_the_pack() -> None:
    raw = [
        good_file(path="/app/a", size=0),
        directory(),
        good_file(path="/app/b", size=65536),
        good_file(path="/app/c", size=65537),
        good_file(path="/app/e", size=1),
    ]

    parsed = parse_manifest(manifest(raw))

    offsets = [entry.offset for entry in parsed.entries if entry.type == "file"]
    # An object is its plaintext plus a 16-byte tag per 64 KiB chunk, an empty file one chunk.
    assert offsets == [0, 16, 16 + 65552, 16 + 65552 + 65537 + 32]
    assert parsed.pack_size() == offsets[-1] + 17


def test_unknown_header_fields_are_ignored() -> None:
    (entry,) = parse_manifest(manifest([good_file()], comment="from a newer sealer")).entries
    (plain,) = parse_manifest(manifest([good_file()])).entries

    assert entry == plain
