"""The protected file system format, version 2: constants, sizes, chunk layout and the manifest.

A sealed volume is two files: the fspf and the pack, which contains the ciphertext object of
every regular file.

* Plaintext is cut into chunks of :data:`CHUNK_SIZE` bytes. Each file has a random 32-byte
  key and a random 16-byte file id. Chunk ``i`` is sealed with AES-256-GCM under the file key
  with nonce :func:`chunk_nonce` and associated data :func:`chunk_aad`. The associated data
  binds the chunk to its file, its position and whether it is the last one, so chunks cannot
  be reordered, moved between files, dropped or appended. An empty file is one empty last chunk.
* A file's object is the concatenation of its sealed chunks (:func:`sealed_size`). The pack
  is the objects of the manifest's file entries in manifest order, with nothing between or
  after them, so each file's offset in it follows from the sizes before it. One pack instead
  of a file per object saves the launcher three system calls a file at every start, and it
  no longer shows each protected file's size in the image, only their sum.
* The fspf is :data:`FSPF_HEADER` (magic and format version), a 12-byte nonce and the
  AES-256-GCM encryption, under the volume key with the header as associated data, of the
  manifest as JSON with sorted keys. The volume key and the fspf's GCM tag (its last 16 bytes)
  are kept outside the image, so the tag pins one exact fspf and an older one is rejected.

This module is carried into confidential images, so it uses only the standard library and
Python 3.8 syntax.
"""

from __future__ import annotations

import math
import struct

from enclavify import jsontext
from enclavify.errors import ProtectError
from enclavify.values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs about 2 ms at every container start
    from collections.abc import Callable
    from typing import Any

FORMAT_VERSION = 2
CHUNK_SIZE = 65536
TAG_SIZE = 16
NONCE_SIZE = 12
KEY_SIZE = 32
FILE_ID_SIZE = 16

# The names of a sealed volume's two files, side by side in one directory.
FSPF_NAME = "fspf"
PACK_NAME = "pack"

FSPF_MAGIC = b"ENCLAVIFY-FSPF\x00"
FSPF_HEADER = FSPF_MAGIC + bytes([FORMAT_VERSION])
FSPF_HEADER_SIZE = len(FSPF_HEADER)
CHUNK_AAD_PREFIX = b"enclavify-chunk-v1"

# Bounds on chunk_size read from an fspf. The lower one keeps the per-chunk tag overhead sane;
# the upper one keeps a hostile fspf from making the unsealer allocate huge buffers.
MIN_CHUNK_SIZE = 512
MAX_CHUNK_SIZE = 1 << 24

ENTRY_TYPES = ("dir", "file", "symlink", "hardlink")

_MAX_ID = (1 << 32) - 1


def chunk_count(plain_size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Return the number of chunks of a file of ``plain_size`` bytes (at least one)."""
    if plain_size < 0:
        raise ValueError(f"file size must not be negative, got {plain_size}")
    return max(1, -(-plain_size // chunk_size))


def sealed_size(plain_size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Return the size of the object that seals a file of ``plain_size`` bytes."""
    return plain_size + TAG_SIZE * chunk_count(plain_size, chunk_size)


def chunk_nonce(index: int) -> bytes:
    """Return the GCM nonce of chunk ``index``: 4 zero bytes and the index as 8 bytes big-endian.

    Nonces repeat across files, which is safe because every file has its own key.
    """
    return b"\x00\x00\x00\x00" + struct.pack(">Q", index)


def chunk_aad(file_id: bytes, index: int, last: bool) -> bytes:
    """Return the associated data of chunk ``index`` of the file with id ``file_id``."""
    return CHUNK_AAD_PREFIX + file_id + struct.pack(">QB", index, 1 if last else 0)


class Entry:
    """One file system object of a protected region.

    ``type`` is one of :data:`ENTRY_TYPES`. ``mode`` contains permission bits only (no file
    type bits). Files carry ``size``, ``key``, ``file_id`` and ``offset``, where their object
    starts in the pack (not stored: it follows from the files before); symlinks and hardlinks
    carry ``target``. A hardlink's metadata is that of its target, so
    its ``mode``, ``uid``, ``gid`` and ``mtime`` are unused and zero.

    Entries are not changed after they are made. A plain class rather than a dataclass,
    because the launcher imports this module at every container start and the dataclasses
    module costs about 5 ms there.
    """

    FIELDS = ("type", "path", "mode", "uid", "gid", "mtime", "size", "offset", "key",
              "file_id", "target")

    def __init__(
        self,
        *,
        type: str,
        path: str,
        mode: int = 0,
        uid: int = 0,
        gid: int = 0,
        mtime: float = 0.0,
        size: int = 0,
        offset: int = 0,
        key: bytes = b"",
        file_id: bytes = b"",
        target: str = "",
    ) -> None:
        self.type = type
        self.path = path
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.size = size
        self.offset = offset
        self.key = key
        self.file_id = file_id
        self.target = target

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((self.type, self.path))

    def __repr__(self) -> str:
        # The key is left out, so that logging an entry does not print it.
        shown = ", ".join(f"{name}={self.__dict__[name]!r}" for name in self.FIELDS
                          if name != "key")
        return f"Entry({shown})"

    def to_json(self) -> dict[str, Any]:
        """Return the entry as stored in the manifest."""
        if self.type == "hardlink":
            return {"type": self.type, "path": self.path, "target": self.target}
        data: dict[str, Any] = {
            "type": self.type,
            "path": self.path,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "mtime": self.mtime,
        }
        if self.type == "file":
            data["size"] = self.size
            data["key"] = self.key.hex()
            data["file_id"] = self.file_id.hex()
        elif self.type == "symlink":
            data["target"] = self.target
        return data


class Manifest(Value):
    """The verified content of an fspf: protected regions and their entries in sealing order."""

    __slots__ = ("chunk_size", "entries", "format", "regions")
    HIDDEN = ("entries",)  # thousands of them, each with its file key left out anyway

    def __init__(
        self,
        *,
        regions: tuple[str, ...],
        entries: tuple[Entry, ...],
        chunk_size: int = CHUNK_SIZE,
        format: int = FORMAT_VERSION,
    ) -> None:
        self.regions = regions
        self.entries = entries
        self.chunk_size = chunk_size
        self.format = format

    def pack_size(self) -> int:
        """Return the size of the pack: the objects of all file entries."""
        chunk_size = self.chunk_size
        return sum(
            sealed_size(entry.size, chunk_size) for entry in self.entries if entry.type == "file"
        )

    def to_json_bytes(self) -> bytes:
        """Return the manifest as canonical JSON (sorted keys, ASCII only)."""
        # Imported here: the launcher only parses manifests, and json imports re.
        import json  # noqa: PLC0415

        document = {
            "format": self.format,
            "chunk_size": self.chunk_size,
            "regions": list(self.regions),
            "entries": [entry.to_json() for entry in self.entries],
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")


def read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    """Call ``read`` until it has returned ``size`` bytes in all or reports the end with b"".

    Streams, pipes and ``os.read`` may return fewer bytes than requested before the end, so
    a short result from this function always means the data ended.
    """
    parts = []
    remaining = size
    while remaining:
        data = read(remaining)
        if not data:
            break
        parts.append(data)
        remaining -= len(data)
    return b"".join(parts)


def check_path(path: str, label: str = "path") -> str:
    """Return ``path`` if it is absolute and normalized, else raise :class:`ProtectError`.

    Normalized means no empty, ``.`` or ``..`` component, no trailing slash and no NUL, so
    that joining it under a target root can never leave that root.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise ProtectError(f"{label} {path!r} is not an absolute path")
    if "\x00" in path:
        raise ProtectError(f"{label} {path!r} contains a NUL byte")
    if path == "/":
        return path
    for part in path[1:].split("/"):
        if part in ("", ".", ".."):
            raise ProtectError(f"{label} {path!r} is not normalized (empty, '.' or '..' component)")
    return path


def is_within(path: str, region: str) -> bool:
    """Return whether ``path`` is ``region`` or lies below it (both normalized)."""
    return region in ("/", path) or path.startswith(region + "/")


def region_of(path: str, regions: tuple[str, ...] | list[str]) -> str | None:
    """Return the region that contains ``path``, or None."""
    for region in regions:
        if is_within(path, region):
            return region
    return None


def check_metadata(where: str, *, mode: int, uid: int, gid: int, mtime: float) -> None:
    """Raise :class:`ProtectError` unless mode, owner and mtime can be restored as given."""
    if not 0 <= mode <= 0o7777:
        raise ProtectError(f"{where}: mode {mode:o} is not permission bits")
    if not (0 <= uid <= _MAX_ID and 0 <= gid <= _MAX_ID):
        raise ProtectError(f"{where}: owner {uid}:{gid} out of range")
    try:
        finite = math.isfinite(mtime)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ProtectError(f"{where}: mtime {mtime!r} is not a finite number")


def _field(raw: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = raw.get(name)
    # bool is an int subclass, and JSON true must not pass as a mode or an owner.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtectError(f"invalid fspf: {where}: field {name!r} missing or not {kind.__name__}")
    return value


def _hex_field(raw: dict[str, Any], name: str, size: int, where: str) -> bytes:
    text = _field(raw, name, str, where)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != size or value.hex() != text:
        raise ProtectError(f"invalid fspf: {where}: field {name!r} is not {size} bytes of hex")
    return value


def _metadata(raw: dict[str, Any], where: str) -> dict[str, Any]:
    mode = _field(raw, "mode", int, where)
    uid = _field(raw, "uid", int, where)
    gid = _field(raw, "gid", int, where)
    mtime = raw.get("mtime")
    if isinstance(mtime, bool) or not isinstance(mtime, (int, float)):
        raise ProtectError(f"invalid fspf: {where}: field 'mtime' missing or not a number")
    check_metadata(f"invalid fspf: {where}", mode=mode, uid=uid, gid=gid, mtime=mtime)
    return {"mode": mode, "uid": uid, "gid": gid, "mtime": float(mtime)}


def _parse_entry(raw: Any, regions: tuple[str, ...], index: int, offset: int) -> Entry:
    """Validate one entry thoroughly; used when the fast checks of :func:`parse_manifest` fail.

    ``offset`` is where a file's object starts in the pack. Raises the precise
    :class:`ProtectError` for the first problem found.
    """
    if not isinstance(raw, dict):
        raise ProtectError(f"invalid fspf: entry {index} is not an object")
    path = check_path(_field(raw, "path", str, f"entry {index}"), "entry path")
    if region_of(path, regions) is None:
        raise ProtectError(f"invalid fspf: entry {path!r} lies outside every protected region")
    kind = raw.get("type")
    if kind == "hardlink":
        target = check_path(_field(raw, "target", str, path), "hardlink target")
        return Entry(type="hardlink", path=path, target=target)
    if kind == "dir":
        return Entry(type="dir", path=path, **_metadata(raw, path))
    if kind == "symlink":
        target = _field(raw, "target", str, path)
        if not target or "\x00" in target:
            raise ProtectError(f"invalid fspf: symlink {path!r} has an empty or NUL target")
        return Entry(type="symlink", path=path, target=target, **_metadata(raw, path))
    if kind == "file":
        size = _field(raw, "size", int, path)
        if size < 0:
            raise ProtectError(f"invalid fspf: file {path!r} has negative size")
        return Entry(
            type="file",
            path=path,
            size=size,
            offset=offset,
            key=_hex_field(raw, "key", KEY_SIZE, path),
            file_id=_hex_field(raw, "file_id", FILE_ID_SIZE, path),
            **_metadata(raw, path),
        )
    raise ProtectError(f"invalid fspf: entry {path!r} has unknown type {kind!r}")


def _is_normal(path: str) -> bool:
    """Return whether ``path`` is absolute and normalized (False for "/", unlike check_path)."""
    padded = path + "/"
    return (
        path[:1] == "/"
        and "//" not in padded
        and "/./" not in padded
        and "/../" not in padded
        and "\x00" not in path
    )


_new_object = object.__new__
# Default values of the fields an entry of each type lacks. Calling Entry's __init__ with 11
# keyword arguments costs about 1 µs an entry, so _quick_entry turns the entry's JSON object
# into the instance dictionary instead.
_SYMLINK_REST: dict[str, Any] = {"size": 0, "offset": 0, "key": b"", "file_id": b""}
_DIRECTORY_REST: dict[str, Any] = {**_SYMLINK_REST, "target": ""}
_HARDLINK_REST: dict[str, Any] = {**_SYMLINK_REST, "mode": 0, "uid": 0, "gid": 0, "mtime": 0.0}


def _quick_entry(
    raw: Any, exact: frozenset[str], below: tuple[str, ...], offset: int
) -> Entry | None:
    """Return the entry ``raw`` describes if it passes cheap checks, else None.

    On success ``raw`` itself becomes the entry's instance dictionary, changed in place. A
    file's object starts at ``offset`` in the pack.

    ``exact`` and ``below`` are from :func:`_region_test`. The checks here only accept what
    :func:`_parse_entry` accepts; anything else, including every malformed entry, gets None
    and then the thorough checks and their messages. Duplicates and hardlink targets are
    checked by the caller either way. Helpers are written out here, because this runs for
    every entry at every confidential start.
    """
    if type(raw) is not dict:
        return None
    get = raw.get
    path = get("path")
    if type(path) is not str:
        return None
    padded = path + "/"
    if (
        path[:1] != "/"
        or "//" in padded
        or "/./" in padded
        or "/../" in padded
        or "\x00" in path
        or not (path in exact or path.startswith(below))
    ):
        return None
    kind = get("type")
    if kind == "hardlink":
        target = get("target")
        if type(target) is not str or not _is_normal(target) or len(raw) != 3:
            return None
        raw.update(_HARDLINK_REST)
    else:
        mode = get("mode")
        uid = get("uid")
        gid = get("gid")
        mtime = get("mtime")
        if not (
            type(mode) is int
            and type(uid) is int
            and type(gid) is int
            and type(mtime) is float
            and 0 <= mode <= 0o7777
            and 0 <= uid <= _MAX_ID
            and 0 <= gid <= _MAX_ID
            and _isfinite(mtime)
        ):
            return None
        if kind == "file":
            size = get("size")
            key_text = get("key")
            file_id_text = get("file_id")
            if (
                type(size) is not int
                or size < 0
                or type(key_text) is not str
                or len(key_text) != 2 * KEY_SIZE
                or type(file_id_text) is not str
                or len(file_id_text) != 2 * FILE_ID_SIZE
                or len(raw) != 9
            ):
                return None
            try:
                key = bytes.fromhex(key_text)
                file_id = bytes.fromhex(file_id_text)
            except ValueError:
                return None
            # fromhex also takes upper case and spaces, which the canonical form never has.
            if key.hex() != key_text or file_id.hex() != file_id_text:
                return None
            raw["key"] = key
            raw["file_id"] = file_id
            raw["offset"] = offset
            raw["target"] = ""
        elif kind == "symlink":
            target = get("target")
            if type(target) is not str or not target or "\x00" in target or len(raw) != 7:
                return None
            raw.update(_SYMLINK_REST)
        elif kind == "dir" and len(raw) == 6:
            raw.update(_DIRECTORY_REST)
        else:
            return None
    # Now exactly the fields of an Entry, so the dictionary becomes the entry's own.
    entry: Entry = _new_object(Entry)
    entry.__dict__ = raw
    return entry


_isfinite = math.isfinite


def _region_test(regions: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Return ``exact`` and ``below`` for :func:`_quick_entry`.

    A normalized path lies in a region if it is one of ``exact`` or starts with one of
    ``below`` (the regions with a slash appended, "/" itself for the region "/").
    """
    return frozenset(regions), tuple(region.rstrip("/") + "/" for region in regions)


def parse_manifest(plaintext: bytes) -> Manifest:
    """Parse and validate the decrypted manifest JSON.

    Besides types and ranges this checks that every path is absolute and normalized, lies
    within a region, occurs once, and that every hardlink names an earlier file entry. Each
    file entry gets its object's offset in the pack.

    Raises:
        ProtectError: the manifest is malformed or of an unsupported format version.
    """
    try:
        document = jsontext.loads(plaintext.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtectError("invalid fspf: manifest is not JSON") from exc
    if not isinstance(document, dict):
        raise ProtectError("invalid fspf: manifest is not a JSON object")
    version = document.get("format")
    if version != FORMAT_VERSION:
        raise ProtectError(
            f"unsupported fspf format version {version!r}; this version reads {FORMAT_VERSION}"
        )
    chunk_size = _field(document, "chunk_size", int, "manifest")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ProtectError(f"invalid fspf: chunk size {chunk_size} out of range")
    raw_regions = document.get("regions")
    if not isinstance(raw_regions, list):
        raise ProtectError("invalid fspf: 'regions' is not a list")
    regions = tuple(check_path(region, "region") for region in raw_regions)
    raw_entries = document.get("entries")
    if not isinstance(raw_entries, list):
        raise ProtectError("invalid fspf: 'entries' is not a list")

    # This loop runs for every entry at every confidential start, so it is kept lean: cheap
    # checks first (_quick_entry), the thorough ones with their messages only when those fail.
    exact, below = _region_test(regions)
    entries = []
    kinds: dict[str, str] = {}
    offset = 0
    for index, raw in enumerate(raw_entries):
        entry = _quick_entry(raw, exact, below, offset) or _parse_entry(
            raw, regions, index, offset
        )
        path = entry.path
        kind = entry.type
        if path in kinds:
            raise ProtectError(f"invalid fspf: entry {path!r} occurs twice")
        if kind == "file":
            offset += sealed_size(entry.size, chunk_size)
        elif kind == "hardlink" and kinds.get(entry.target) != "file":
            raise ProtectError(f"invalid fspf: hardlink {path!r} does not name an earlier file")
        kinds[path] = kind
        entries.append(entry)
    return Manifest(regions=regions, entries=tuple(entries), chunk_size=chunk_size)


def split_fspf(data: bytes) -> tuple[bytes, bytes, bytes]:
    """Split an fspf into (header, nonce, ciphertext with tag) after checking the header.

    Raises:
        ProtectError: not an fspf, or one of another format version.
    """
    if len(data) < FSPF_HEADER_SIZE + NONCE_SIZE + TAG_SIZE or not data.startswith(FSPF_MAGIC):
        raise ProtectError("not an enclavify fspf (bad magic or too short)")
    version = data[len(FSPF_MAGIC)]
    if version != FORMAT_VERSION:
        raise ProtectError(
            f"unsupported fspf format version {version}; this version reads {FORMAT_VERSION}"
            " (convert the image again with the enclavify that runs it)"
        )
    header = data[:FSPF_HEADER_SIZE]
    nonce = data[FSPF_HEADER_SIZE : FSPF_HEADER_SIZE + NONCE_SIZE]
    return header, nonce, data[FSPF_HEADER_SIZE + NONCE_SIZE :]
