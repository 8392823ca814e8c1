"""The manifest parser's cheap checks accept only what its thorough checks accept.

parse_manifest first tries cheap checks on each entry and falls back to thorough ones, which
also word the error. These tests make sure the two agree: an entry that passes the cheap
checks is exactly the entry the thorough checks build, and a malformed entry still fails with
the thorough checks' message.
"""

from __future__ import annotations

import copy
import json
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
    _parse_entry,
    _quick_entry,
    _region_test,
    check_path,
    parse_manifest,
    region_of,
)

REGIONS = ("/app", "/srv/data")
KEY = "ab" * 32
FILE_ID = "cd" * 16


def manifest(entries: list[Any], regions: tuple[str, ...] = REGIONS) -> bytes:
    document = {
        "format": FORMAT_VERSION,
        "chunk_size": 65536,
        "regions": list(regions),
        "entries": entries,
    }
    return json.dumps(document).encode()


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


def test_parsed_entries_equal_ordinary_entries() -> None:
    raw = [
        {"type": "dir", "path": "/app", "mode": 0o755, "uid": 0, "gid": 0, "mtime": 1.0},
        good_file(),
        {
            "type": "symlink",
            "path": "/app/l",
            "target": "f",
            "mode": 0o777,
            "uid": 0,
            "gid": 0,
            "mtime": 2.0,
        },
        {"type": "hardlink", "path": "/srv/data/h", "target": "/app/f"},
    ]

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


def test_integer_mtime_is_accepted_as_float() -> None:
    (entry,) = parse_manifest(manifest([good_file(mtime=7)])).entries

    assert entry.mtime == 7.0
    assert isinstance(entry.mtime, float)


def test_root_region_holds_every_path() -> None:
    raw = [{"type": "dir", "path": "/", "mode": 0o755, "uid": 0, "gid": 0, "mtime": 1.0}]
    raw.append(good_file(path="/x"))

    entries = parse_manifest(manifest(raw, regions=("/",))).entries

    assert [entry.path for entry in entries] == ["/", "/x"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"path": "/app//f"}, "not normalized"),
        ({"path": "/app/./f"}, "not normalized"),
        ({"path": "/app/f/.."}, "not normalized"),
        ({"path": "/app/f/"}, "not normalized"),
        ({"path": "app/f"}, "not an absolute path"),
        ({"path": "/app/f\x00"}, "NUL"),
        ({"path": "/application/f"}, "outside every protected region"),
        ({"path": "/srv"}, "outside every protected region"),
        ({"key": KEY.upper()}, "'key' is not 32 bytes of hex"),
        ({"key": " " + KEY[1:]}, "'key' is not 32 bytes of hex"),
        ({"file_id": FILE_ID + "00"}, "'file_id' is not 16 bytes of hex"),
        ({"size": 3.0}, "'size' missing or not int"),
        ({"uid": True}, "'uid' missing or not int"),
        ({"gid": 1 << 32}, "out of range"),
        ({"mode": 0o10000}, "is not permission bits"),
        ({"mtime": 10**400}, "not a finite number"),
        ({"mtime": None}, "'mtime' missing or not a number"),
    ],
)
def test_malformed_file_entry_gets_the_thorough_message(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ProtectError, match=message):
        parse_manifest(manifest([good_file(**changes)]))


@pytest.mark.parametrize("mtime", [math.inf, -math.inf, math.nan])
def test_nan_and_infinity_are_not_json(mtime: float) -> None:
    # json.dumps writes them as Infinity and NaN, which RFC 8259 does not allow; the launcher's
    # parser (enclavify.jsontext) refuses them before any entry is looked at.
    with pytest.raises(ProtectError, match="manifest is not JSON"):
        parse_manifest(manifest([good_file(mtime=mtime)]))


def test_hardlink_with_unnormalized_target_is_rejected() -> None:
    raw = [good_file(), {"type": "hardlink", "path": "/app/h", "target": "/app/./f"}]

    with pytest.raises(ProtectError, match=re.escape("target '/app/./f' is not normalized")):
        parse_manifest(manifest(raw))


# Values that are sometimes valid, sometimes not, for every field an entry may have.
paths = st.sampled_from(
    ["/app", "/app/f", "/srv/data/x", "/", "/app/", "/app//f", "/app/.", "/app/..", "/apps",
     "/srv", "app", "", "/app/\x00", "/app/.hidden", "/app/..x"]
)  # fmt: skip
numbers = st.one_of(
    st.sampled_from([0, 1, 0o644, 0o7777, 0o10000, -1, (1 << 32) - 1, 1 << 32, True, False]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.none(),
    st.just("1"),
)
hex_texts = st.one_of(
    st.sampled_from([KEY, FILE_ID, KEY.upper(), KEY[:-1] + " ", "", "zz" * 32]),
    st.text(alphabet="0123456789abcdefABX ", max_size=70),
    st.none(),
)
raw_entries = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["file", "dir", "symlink", "hardlink", "device", None]),
        "path": paths,
        "target": st.one_of(paths, st.sampled_from(["x", "../y"])),
        "mode": numbers,
        "uid": numbers,
        "gid": numbers,
        "mtime": numbers,
        "size": numbers,
        "key": hex_texts,
        "file_id": hex_texts,
    },
)


@settings(max_examples=400, deadline=None)
@given(raw=st.one_of(raw_entries, st.builds(good_file), st.none(), st.lists(st.integers())))
def test_cheap_checks_never_accept_what_thorough_checks_reject(raw: Any) -> None:
    # _quick_entry turns a dictionary it accepts into the entry's own.
    quick = _quick_entry(copy.deepcopy(raw), *_region_test(REGIONS), 1234)
    try:
        thorough: Entry | None = _parse_entry(raw, REGIONS, 0, 1234)
    except ProtectError:
        thorough = None
    if quick is not None:
        assert quick == thorough


@given(path=paths, regions=st.lists(st.sampled_from(["/app", "/srv/data", "/", "/a"]), max_size=3))
def test_region_test_agrees_with_region_of(path: str, regions: list[str]) -> None:
    try:
        check_path(path)
    except ProtectError:
        return  # the region test is for normalized paths only
    exact, below = _region_test(tuple(regions))

    assert (path in exact or path.startswith(below)) == (region_of(path, regions) is not None)


def test_unknown_fields_are_ignored() -> None:
    (entry,) = parse_manifest(manifest([good_file(comment="from a newer sealer")])).entries
    (plain,) = parse_manifest(manifest([good_file()])).entries

    assert entry == plain
    assert not hasattr(entry, "comment")


def test_objects_follow_each_other_in_the_pack() -> None:
    raw = [
        good_file(path="/app/a", size=0),
        {"type": "dir", "path": "/app/d", "mode": 0o755, "uid": 0, "gid": 0, "mtime": 1.0},
        good_file(path="/app/b", size=65536),
        good_file(path="/app/c", size=65537),
        good_file(path="/app/e", size=1),
    ]

    parsed = parse_manifest(manifest(raw))

    offsets = [entry.offset for entry in parsed.entries if entry.type == "file"]
    # An object is its plaintext plus a 16-byte tag per 64 KiB chunk, an empty file one chunk.
    assert offsets == [0, 16, 16 + 65552, 16 + 65552 + 65537 + 32]
    assert parsed.pack_size() == offsets[-1] + 17
