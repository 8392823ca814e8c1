"""The index's fast tar header decoder agrees with tarfile's on every header it decodes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavify.image import tarindex
from enclavify.image.tarindex import _decode_header, _IndexTarInfo

ENCODING, ERRORS = "utf-8", "surrogateescape"
FIELDS = ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname",
          "uname", "gname", "devmajor", "devminor")


def decoded_by_tarfile(buf: bytes) -> tuple[Any, ...] | type[BaseException]:
    try:
        info = tarfile.TarInfo.frombuf(buf, ENCODING, ERRORS)
    except tarfile.HeaderError as error:
        return type(error)
    return tuple(getattr(info, field) for field in FIELDS)


def decoded_by_index(buf: bytes) -> tuple[Any, ...] | type[BaseException]:
    try:
        info = _IndexTarInfo.frombuf(buf, ENCODING, ERRORS)
    except tarfile.HeaderError as error:
        return type(error)
    return tuple(getattr(info, field) for field in FIELDS)


def with_checksum(buf: bytes) -> bytes:
    """Return ``buf`` with a correct unsigned checksum, written as tar writers write it."""
    blank = buf[:148] + b" " * 8 + buf[156:]
    return buf[:148] + b"%06o\0 " % sum(blank) + buf[156:]


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
    min_size=1, max_size=140,
)
kinds = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE,
                         tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])


@st.composite
def headers(draw: st.DrawFn) -> list[bytes]:
    """The 512-byte blocks of one member written in ustar, GNU or PAX form."""
    # In old archives a trailing slash marks a directory, whatever the type field is.
    info = tarfile.TarInfo(draw(st.one_of(names, names.map(lambda name: name + "/"))))
    info.type = draw(kinds)
    info.mode = draw(st.integers(0, 0o7777))
    info.uid = draw(st.integers(0, 1 << 40))
    info.gid = draw(st.integers(0, 1 << 21))
    info.size = draw(st.integers(0, 1 << 40)) if info.type == tarfile.REGTYPE else 0
    info.mtime = draw(st.integers(-(1 << 34), 1 << 34))
    info.linkname = draw(names) if info.type in (tarfile.LNKTYPE, tarfile.SYMTYPE) else ""
    info.uname = draw(st.sampled_from(["", "root", "app", "ü"]))
    info.devmajor = draw(st.integers(0, 255))
    info.devminor = draw(st.integers(0, 255))
    form = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    try:
        data = info.tobuf(form, ENCODING, ERRORS)
    except ValueError:  # ustar cannot hold every name or number
        data = info.tobuf(tarfile.GNU_FORMAT, ENCODING, ERRORS)
    return [data[start:start + 512] for start in range(0, len(data), 512)]


@settings(max_examples=400, deadline=None)
@given(headers())
def test_decoder_matches_tarfile_written_headers(blocks: list[bytes]) -> None:
    for block in blocks:
        assert decoded_by_index(block) == decoded_by_tarfile(block)


@settings(max_examples=600, deadline=None)
@given(headers(), st.data())
def test_decoder_matches_tarfile_altered_headers(
    blocks: list[bytes], data: st.DataObject
) -> None:
    # Bytes changed anywhere, and then the checksum made to match again, so that the fast
    # decoder does not simply hand the header over for a bad checksum.
    block = bytearray(blocks[-1])
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, 511))
        block[position] = data.draw(st.sampled_from(
            [0, 0x20, 0x2F, 0x30, 0x37, 0x38, 0x39, 0x09, 0x5F, 0x2B, 0x80, 0xFF, 0xC3]
        ))
    for altered in (bytes(block), with_checksum(bytes(block))):
        assert decoded_by_index(altered) == decoded_by_tarfile(altered)


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        (b"\0" * 512, "end-of-archive block"),
        (b"\0" * 100, "short block"),
        (with_checksum(b"a" * 100 + b"\x80" + b"\0" * 6 + b"\x01" + b"\0" * 404),
         "base-256 mode"),
        (with_checksum(b"a" * 100 + b"0000644\0" + b"\0" * 48 + b"S" + b"\0" * 355),
         "old GNU sparse entry"),
    ],
)
def test_decoder_leaves_unusual_headers(block: bytes, reason: str) -> None:
    assert _decode_header(_IndexTarInfo, block, ENCODING, ERRORS) is None, reason
    assert decoded_by_index(block) == decoded_by_tarfile(block)


def test_decoder_old_style_directory() -> None:
    info = tarfile.TarInfo("srv/data/")
    info.type = tarfile.AREGTYPE
    block = info.tobuf(tarfile.USTAR_FORMAT, ENCODING, ERRORS)
    decoded = _decode_header(_IndexTarInfo, block, ENCODING, ERRORS)
    assert decoded is not None
    assert (decoded.name, decoded.type) == ("srv/data", tarfile.DIRTYPE)


def test_decoder_common_header_fast() -> None:
    info = tarfile.TarInfo("usr/lib/python3.11/os.py")
    info.size, info.mode, info.mtime = 39504, 0o644, 1_700_000_000
    block = info.tobuf(tarfile.GNU_FORMAT, ENCODING, ERRORS)
    decoded = _decode_header(_IndexTarInfo, block, ENCODING, ERRORS)
    assert decoded is not None
    assert (decoded.name, decoded.size, decoded.mode) == ("usr/lib/python3.11/os.py", 39504, 0o644)


def test_index_layer_uses_fast_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whichever method this Python's tarfile calls (frombuf, or _frombuf in newer releases),
    # indexing must go through the fast decoder.
    calls: list[bytes] = []
    decode = tarindex._decode_header

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1])
        return decode(*args, **kwargs)

    monkeypatch.setattr(tarindex, "_decode_header", counting)
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("etc", "etc/hostname"):
            info = tarfile.TarInfo(name)
            if name == "etc":
                info.type = tarfile.DIRTYPE
            else:
                info.size = 5
            tar.addfile(info, io.BytesIO(b"host\n") if info.isfile() else None)
    entries = tarindex.index_layer(layer, "test")
    assert [entry.path for entry in entries] == ["/etc", "/etc/hostname"]
    assert len(calls) >= 2


@pytest.mark.skipif(
    not hasattr(tarfile.TarInfo, "_frombuf"),
    reason="this Python's tarfile has no _frombuf (newer releases added it in a security fix)",
)
@pytest.mark.parametrize("dircheck", [True, False])
def test_frombuf_dircheck_matches_tarfile(dircheck: bool) -> None:
    info = tarfile.TarInfo("srv/data/")
    info.type = tarfile.AREGTYPE
    block = info.tobuf(tarfile.USTAR_FORMAT, ENCODING, ERRORS)
    ours = _IndexTarInfo._frombuf(block, ENCODING, ERRORS, dircheck=dircheck)
    theirs = tarfile.TarInfo._frombuf(  # type: ignore[attr-defined]
        block, ENCODING, ERRORS, dircheck=dircheck
    )
    assert [getattr(ours, field) for field in FIELDS] == [
        getattr(theirs, field) for field in FIELDS
    ]


def test_decoder_without_dircheck_keeps_file() -> None:
    info = tarfile.TarInfo("srv/data/")
    info.type = tarfile.AREGTYPE
    block = info.tobuf(tarfile.USTAR_FORMAT, ENCODING, ERRORS)
    decoded = _decode_header(_IndexTarInfo, block, ENCODING, ERRORS, dircheck=False)
    assert decoded is not None
    assert decoded.type == tarfile.AREGTYPE


def test_decoder_skips_bytearray_header() -> None:
    block = tarfile.TarInfo("etc/hostname").tobuf(tarfile.GNU_FORMAT, ENCODING, ERRORS)
    assert _decode_header(_IndexTarInfo, bytearray(block), ENCODING, ERRORS) is None
