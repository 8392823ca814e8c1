"""The protected file system format, version 3: constants, sizes, chunk layout and the manifest.

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
  manifest. The volume key and the fspf's GCM tag (its last 16 bytes) are kept outside the
  image, so the tag pins one exact fspf and an older one is rejected.
* The manifest is a header line, canonical JSON (sorted keys, ASCII) followed by ``\n``, with
  ``chunk_size``, ``entries`` (their number), ``format`` and ``regions``. Then come one
  :data:`RECORD` per entry, little-endian: type (the index in :data:`ENTRY_TYPES`), mode,
  uid, gid, mtime (a double), size, and the lengths of path and target in bytes. Then, for
  each entry in order, its path and target (UTF-8, with bytes that are not UTF-8 kept as they
  are) and, for a file, its key and file id. Nothing follows. Version 2 stored the whole
  manifest as JSON: reading and parsing 1750 entries took about 7 ms of each confidential
  start in a container, 4.5 ms in this layout.

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

FORMAT_VERSION = 3
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
_DIRECTORY, _FILE, _SYMLINK, _HARDLINK = range(len(ENTRY_TYPES))
_TYPE_CODES = {name: code for code, name in enumerate(ENTRY_TYPES)}

# An entry's fixed part in the manifest: type, mode, uid, gid, mtime, size, path length and
# target length.
RECORD = struct.Struct("<HHIIdQII")

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

    def to_bytes(self) -> bytes:
        """Return the manifest in the layout the module's docstring describes."""
        header = {
            "chunk_size": self.chunk_size,
            "entries": len(self.entries),
            "format": self.format,
            "regions": list(self.regions),
        }
        records: list[bytes] = []
        names: list[bytes] = []
        for entry in self.entries:
            path = entry.path.encode("utf-8", "surrogateescape")
            target = entry.target.encode("utf-8", "surrogateescape")
            records.append(
                RECORD.pack(
                    _TYPE_CODES[entry.type], entry.mode, entry.uid, entry.gid,
                    float(entry.mtime), entry.size, len(path), len(target),
                )
            )
            names += (path, target)
            if entry.type == "file":
                names += (entry.key, entry.file_id)
        return jsontext.dumps(header).encode("ascii") + b"\n" + b"".join(records + names)


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
    # bool is an int subclass, and JSON true must not pass as a number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtectError(f"invalid fspf: {where}: field {name!r} missing or not {kind.__name__}")
    return value


def _parse_header(plaintext: bytes) -> tuple[int, int, tuple[str, ...], int]:
    """Return chunk size, number of entries, regions and where the records start."""
    line_end = plaintext.find(b"\n")
    if line_end < 0:
        raise ProtectError("invalid fspf: the manifest has no header line")
    try:
        header = jsontext.loads(plaintext[:line_end].decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtectError("invalid fspf: the manifest header is not JSON") from exc
    if not isinstance(header, dict):
        raise ProtectError("invalid fspf: the manifest header is not a JSON object")
    version = header.get("format")
    if version != FORMAT_VERSION:
        raise ProtectError(
            f"unsupported fspf format version {version!r}; this version reads {FORMAT_VERSION}"
        )
    chunk_size = _field(header, "chunk_size", int, "manifest")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ProtectError(f"invalid fspf: chunk size {chunk_size} out of range")
    raw_regions = header.get("regions")
    if not isinstance(raw_regions, list):
        raise ProtectError("invalid fspf: 'regions' is not a list")
    regions = tuple(check_path(region, "region") for region in raw_regions)
    count = _field(header, "entries", int, "manifest")
    if count < 0:
        raise ProtectError(f"invalid fspf: the manifest has {count} entries")
    return chunk_size, count, regions, line_end + 1


def _entry_error(
    record: tuple[Any, ...],
    path: str,
    target: str,
    regions: tuple[str, ...],
    earlier: dict[str, int],
) -> ProtectError:
    """Return the error of an entry that failed the quick checks of :func:`parse_manifest`.

    ``earlier`` maps the paths of the entries before it to their types.
    """
    kind, mode, uid, gid, mtime, size = record[:6]
    try:
        check_path(path, "entry path")
        if region_of(path, regions) is None:
            return ProtectError(f"invalid fspf: entry {path!r} lies outside every protected region")
        if path in earlier:
            return ProtectError(f"invalid fspf: entry {path!r} occurs twice")
        if kind >= len(ENTRY_TYPES):
            return ProtectError(f"invalid fspf: entry {path!r} has unknown type {kind}")
        name = ENTRY_TYPES[kind]
        if kind == _HARDLINK:
            if (mode, uid, gid, mtime, size) != (0, 0, 0, 0.0, 0):
                return ProtectError(f"invalid fspf: hardlink {path!r} has metadata of its own")
            check_path(target, "hardlink target")
            return ProtectError(f"invalid fspf: hardlink {path!r} does not name an earlier file")
        check_metadata(f"invalid fspf: {path}", mode=mode, uid=uid, gid=gid, mtime=mtime)
        if kind == _SYMLINK and (not target or "\x00" in target):
            return ProtectError(f"invalid fspf: symlink {path!r} has an empty or NUL target")
        if kind != _SYMLINK and target:
            return ProtectError(f"invalid fspf: {name} {path!r} has a target")
        return ProtectError(f"invalid fspf: {name} {path!r} has a size")
    except ProtectError as error:
        return error


def _region_test(regions: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Return ``exact`` and ``below`` for the quick region check of :func:`parse_manifest`.

    A normalized path lies in a region if it is one of ``exact`` or starts with one of
    ``below`` (the regions with a slash appended, "/" itself for the region "/").
    """
    return frozenset(regions), tuple(region.rstrip("/") + "/" for region in regions)


_new_object = object.__new__
_isfinite = math.isfinite
_FILE_SECRETS = KEY_SIZE + FILE_ID_SIZE


def parse_manifest(plaintext: bytes) -> Manifest:
    """Parse and validate a decrypted manifest.

    Besides types and ranges this checks that every path is absolute and normalized, lies
    within a region, occurs once, and that every hardlink names an earlier file entry. Each
    file entry gets its object's offset in the pack.

    Raises:
        ProtectError: the manifest is malformed or of an unsupported format version.
    """
    chunk_size, count, regions, records_start = _parse_header(plaintext)
    names_start = records_start + count * RECORD.size
    end = len(plaintext)
    if names_start > end:
        raise ProtectError(f"invalid fspf: the manifest ends within its {count} entry records")

    # This loop runs for every entry at every confidential start, so it is kept lean: cheap
    # checks written out, and _entry_error for the message when one of them fails.
    exact, below = _region_test(regions)
    entries: list[Entry] = []
    kinds: dict[str, int] = {}
    offset = 0
    position = names_start
    records = memoryview(plaintext)[records_start:names_start]
    for record in RECORD.iter_unpack(records):
        kind, mode, uid, gid, mtime, size, path_size, target_size = record
        path_end = position + path_size
        stop = path_end + target_size + (_FILE_SECRETS if kind == _FILE else 0)
        if stop > end:
            raise ProtectError(
                f"invalid fspf: entry {len(entries)} runs past the end of the manifest"
            )
        path = plaintext[position:path_end].decode("utf-8", "surrogateescape")
        target = plaintext[path_end : path_end + target_size].decode("utf-8", "surrogateescape")
        padded = path + "/"
        if (
            path[:1] != "/"
            or ("//" in padded and path != "/")
            or "/./" in padded
            or "/../" in padded
            or "\x00" in path
            or not (path in exact or path.startswith(below))
            or path in kinds
        ):
            raise _entry_error(record, path, target, regions, kinds)
        if kind == _HARDLINK:
            if mode or uid or gid or mtime or size or kinds.get(target) != _FILE:
                raise _entry_error(record, path, target, regions, kinds)
            fields = {"mode": 0, "uid": 0, "gid": 0, "mtime": 0.0, "size": 0, "offset": 0,
                      "key": b"", "file_id": b""}
        else:
            if kind > _HARDLINK or mode > 0o7777 or not _isfinite(mtime):
                raise _entry_error(record, path, target, regions, kinds)
            if kind == _FILE:
                if target_size:
                    raise _entry_error(record, path, target, regions, kinds)
                fields = {"mode": mode, "uid": uid, "gid": gid, "mtime": mtime, "size": size,
                          "offset": offset, "key": plaintext[path_end : path_end + KEY_SIZE],
                          "file_id": plaintext[path_end + KEY_SIZE : stop]}
                offset += sealed_size(size, chunk_size)
            else:
                if size or (target_size if kind == _DIRECTORY else not target or "\x00" in target):
                    raise _entry_error(record, path, target, regions, kinds)
                fields = {"mode": mode, "uid": uid, "gid": gid, "mtime": mtime, "size": 0,
                          "offset": 0, "key": b"", "file_id": b""}
        fields["type"] = ENTRY_TYPES[kind]
        fields["path"] = path
        fields["target"] = target
        # Exactly the fields of an Entry, so the dictionary becomes the entry's own. Calling
        # Entry's __init__ with 11 keyword arguments costs about 1 µs an entry more.
        entry: Entry = _new_object(Entry)
        entry.__dict__ = fields
        kinds[path] = kind
        entries.append(entry)
        position = stop
    if position != end:
        raise ProtectError(f"invalid fspf: {end - position} bytes follow the last entry")
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
