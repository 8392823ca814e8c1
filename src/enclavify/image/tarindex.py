"""Index an uncompressed layer tar without extracting it, and screen hostile entries.

Decisions on entries a layer should not carry (each message names the layer and the entry):

- A name or hardlink target with a ``..`` component is rejected (HostileEntryError), even
  one that would stay inside the root: image builders never write them.
- Names are taken relative to the image root, as container engines do: a leading ``./`` is
  the normal form, a leading ``/`` is stripped with a WARNING, and ``.`` components and
  repeated slashes are dropped. The root entry itself (``./``) is ignored.
- A hardlink must point to a regular file or symlink stored earlier in the same layer;
  anything else (missing, a directory, a whiteout, another layer) is rejected.
- Symlinks may point anywhere: they are stored as links and only ever resolved inside the
  image root (``MergedFilesystem.resolve``), never followed on the host. An entry whose
  parent is a symlink stored earlier in the same layer is rejected: engines would write it
  through the link, somewhere the index would not show it.
- Device nodes and FIFOs are left out of the merged view with a WARNING, and a rewritten
  layer drops them: the container runtime provides ``/dev``, and a device node that an image
  smuggles in cannot be protected or usefully rewritten. Verbatim copies of unchanged layers
  keep them, since their bytes are not altered.
- A name that occurs twice in one layer: the later entry wins, as when a runtime extracts
  the tar; a WARNING is logged when the two are not both directories, because tools that
  read the first copy would see different content than the container does.
- Sparse files are rejected as unsupported (ImageError).
"""

from __future__ import annotations

import logging
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self, TypeVar

from enclavify.errors import HostileEntryError, ImageError

log = logging.getLogger(__name__)

MAX_WARNINGS = 3  # per layer and kind; a summary with the count follows

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

# Entry kinds in the index.
FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
HARDLINK = "hardlink"
WHITEOUT = "whiteout"
OPAQUE = "opaque"
SPECIAL = "special"  # device node or FIFO: indexed so a rewrite can drop it, never merged
META = "meta"  # other .wh..wh.* names (aufs bookkeeping), ignored


@dataclass(slots=True)
class TarEntry:
    """One member of a layer tar.

    ``path`` is absolute and normalised. For whiteouts it is the path being deleted and for
    opaque markers the directory being made opaque. ``header_offset`` is where the member's
    headers start (including PAX/GNU extension headers) and ``end_offset`` where its padded
    data ends, so ``[header_offset, end_offset)`` is the member's exact bytes.
    ``data_offset``/``size`` locate the content; a hardlink carries its target's.
    """

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime: float
    size: int
    linkname: str
    header_offset: int
    data_offset: int
    end_offset: int
    name: str  # the member name as stored in the tar


# The fields of a 512-byte tar header: name, mode, uid, gid, size, mtime, checksum, type,
# link name, magic and version, user name, group name, device major and minor, name prefix.
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")

_Info = TypeVar("_Info", bound=tarfile.TarInfo)


class _IndexTarInfo(tarfile.TarInfo):
    """A TarInfo that decodes the common header forms about three times faster.

    Indexing a layer spends most of its time decoding headers (a Debian base layer has
    6500 members), and it holds the GIL while the layer is still being inflated beside it.
    tarfile sums the 512 bytes twice for its checksum test and parses each number field
    on its own. :func:`_decode_header` does the same work with one struct unpack and
    zlib's adler32 for the sum. Any header it is not sure of (a signed checksum, a base-256
    number, an old sparse entry, anything malformed) goes to tarfile's own decoder, which
    also raises the errors.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        decoded = _decode_header(cls, buf, encoding, errors)
        if decoded is None:
            return super().frombuf(buf, encoding, errors)
        return decoded

    @classmethod
    def _frombuf(
        cls, buf: bytes | bytearray, encoding: str, errors: str, *, dircheck: bool = True
    ) -> Self:
        # Newer Python releases (a security fix of 2025) read headers through this method,
        # not frombuf. They pass dircheck=False for the header after a GNU long name or PAX
        # header, whose name must not turn a regular file into a directory. Older releases
        # have no such method and never call it.
        # NOTE: Python 3.11.7, which the tests here run on, has no _frombuf, so this method
        # and its test comparing it with tarfile's have not run here.
        decoded = _decode_header(cls, buf, encoding, errors, dircheck=dircheck)
        if decoded is None:
            decoder = super()._frombuf  # type: ignore[misc]
            fallback: Self = decoder(buf, encoding, errors, dircheck=dircheck)
            return fallback
        return decoded


def _decode_header(
    cls: type[_Info], buf: bytes | bytearray, encoding: str, errors: str, *,
    dircheck: bool = True,
) -> _Info | None:
    """Decode ``buf`` as :meth:`tarfile.TarInfo.frombuf` does, or return None to leave it to it.

    For every header it decodes, the result equals tarfile's field for field
    (``tests/image/test_tarindex.py`` checks this on generated and altered headers).
    ``dircheck`` is the argument of the newer tarfile's ``_frombuf``: when False, an
    old-style directory name does not change the entry's type.
    """
    # tarfile reads headers as bytes. Any other buffer goes to tarfile, so that the field
    # types stay tarfile's.
    if type(buf) is not bytes or len(buf) != tarfile.BLOCKSIZE:
        return None
    (name, mode, uid, gid, size, mtime, checksum, kind, linkname, _magic, uname, gname,
     devmajor, devminor, prefix) = _HEADER.unpack(buf)
    if kind == tarfile.GNUTYPE_SPARSE:
        return None

    # The unsigned checksum: every byte, with the checksum field counted as 8 spaces. The
    # adler32 of 256 bytes is 1 plus their sum (at most 65280, so never reduced modulo
    # 65521) in its low 16 bits.
    view = memoryview(buf)
    total = (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2
    stored = _octal(checksum)
    if stored is None or stored != total - sum(checksum) + 256:
        return None
    numbers = []
    for field in (mode, uid, gid, size, mtime, devmajor, devminor):
        number = _octal(field)
        if number is None:
            return None
        numbers.append(number)

    info = cls()
    info.name = name.split(b"\0", 1)[0].decode(encoding, errors)
    info.mode, info.uid, info.gid, info.size, info.mtime, info.devmajor, info.devminor = (
        numbers
    )
    info.chksum = stored
    info.type = kind
    info.linkname = linkname.split(b"\0", 1)[0].decode(encoding, errors)
    info.uname = uname.split(b"\0", 1)[0].decode(encoding, errors)
    info.gname = gname.split(b"\0", 1)[0].decode(encoding, errors)
    prefix_text = prefix.split(b"\0", 1)[0].decode(encoding, errors)
    # The same three fix-ups as tarfile: an old-style directory is a regular file whose name
    # ends in a slash, directory names lose trailing slashes, and a ustar prefix is joined.
    if dircheck and kind == tarfile.AREGTYPE and info.name.endswith("/"):
        info.type = tarfile.DIRTYPE
    if info.type == tarfile.DIRTYPE:
        info.name = info.name.rstrip("/")
    if prefix_text and info.type not in tarfile.GNU_TYPES:
        info.name = prefix_text + "/" + info.name
    return info


def _octal(field: bytes) -> int | None:
    """Return the octal number of a header field, or None when tarfile should decide.

    Only a field of spaces and octal digits up to its first NUL is decoded here; tarfile
    reads it the same way. Base-256 numbers, other whitespace and any other byte are left
    to tarfile.
    """
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        return 0
    if not digits.isdigit():
        return None
    try:
        return int(digits, 8)
    except ValueError:  # the digit 8 or 9
        return None


def normalize_name(name: str, *, layer: str, what: str = "entry") -> tuple[str, bool]:
    """Return the absolute form of a tar member name and whether it was absolute.

    Raises:
        HostileEntryError: the name has a ``..`` component.
    """
    absolute = name.startswith("/")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise HostileEntryError(
                f"layer {layer}: {what} {name!r} has a '..' component; rejected"
            )
        parts.append(part)
    return "/" + "/".join(parts), absolute


def index_layer(
    tar_path: Path, layer: str, stream: IO[bytes] | None = None, *, start: int = 0
) -> list[TarEntry]:
    """Read the members of an uncompressed layer tar and return their index, in tar order.

    ``stream``, when given, is read instead of opening ``tar_path``. ``start`` is where the
    tar starts in the file that holds it (a member of an archive); the entries' offsets are
    positions in that file.

    Raises:
        HostileEntryError: a member would escape the root or abuse a link (see module doc).
        ImageError: the tar is malformed or uses an unsupported feature.
    """
    entries: list[TarEntry] = []
    stored: dict[str, TarEntry] = {}
    absolute_names = 0
    specials = 0
    try:
        with tarfile.open(tar_path, mode="r:", fileobj=stream, tarinfo=_IndexTarInfo) as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                # tarfile would otherwise keep every member in memory; the index is enough.
                tar.members = []  # type: ignore[attr-defined]
                entry = _index_member(member, layer, stored, start)
                if entry is None:
                    continue
                if entry.kind == SPECIAL:
                    specials += _report_special(member, entry.path, layer, specials)
                if entry.path != "/" and member.name.startswith("/"):
                    absolute_names += 1
                    if absolute_names == 1:
                        log.warning(
                            "layer %s: entry %r has an absolute name; taken relative to the "
                            "image root",
                            layer,
                            member.name,
                        )
                previous = stored.get(entry.path)
                if (
                    previous is not None
                    and entry.kind not in (WHITEOUT, OPAQUE, META)
                    and not (previous.kind == DIR and entry.kind == DIR)
                ):
                    log.warning(
                        "layer %s: entry %r occurs more than once; the later one wins",
                        layer,
                        member.name,
                    )
                if entry.kind not in (WHITEOUT, OPAQUE, META):
                    stored[entry.path] = entry
                entries.append(entry)
    except tarfile.TarError as exc:
        raise ImageError(f"layer {layer}: malformed tar: {exc}") from exc
    if specials > MAX_WARNINGS:
        log.warning(
            "layer %s: %d device nodes and FIFOs outside /dev in all were left out",
            layer,
            specials,
        )
    if absolute_names > 1:
        log.warning("layer %s: %d entries had absolute names", layer, absolute_names)
    return entries


def _report_special(member: tarfile.TarInfo, path: str, layer: str, reported: int) -> int:
    """Log a device node or FIFO being dropped; return 1 if it counts towards the warnings.

    Images made from a debootstrap tree carry the standard nodes in ``/dev``, which runtimes
    hide under their own ``/dev`` mount, so those are logged at DEBUG only.
    """
    what = "FIFO" if member.isfifo() else "device node"
    if path.startswith("/dev/"):
        log.debug("layer %s: %s %r left out", layer, what, member.name)
        return 0
    if reported < MAX_WARNINGS:
        log.warning(
            "layer %s: %s %r is left out of the image view and of rewritten layers",
            layer,
            what,
            member.name,
        )
    return 1


def _check_parents(path: str, name: str, layer: str, stored: dict[str, TarEntry]) -> None:
    position = path.find("/", 1)
    while position != -1:
        ancestor = stored.get(path[:position])
        if ancestor is not None and ancestor.kind == SYMLINK:
            raise HostileEntryError(
                f"layer {layer}: entry {name!r} lies below {ancestor.name!r}, a symlink in the "
                "same layer; rejected"
            )
        position = path.find("/", position + 1)


def _index_member(
    member: tarfile.TarInfo, layer: str, stored: dict[str, TarEntry], start: int
) -> TarEntry | None:
    path, _ = normalize_name(member.name, layer=layer)
    if path == "/":
        return None  # the root directory's own entry ("./"); runtimes ignore it too
    end = (
        member.offset_data + ((member.size + 511) // 512) * 512
        if member.isreg()
        else (member.offset_data)
    )
    parent, _, base = path.rpartition("/")
    parent = parent or "/"
    _check_parents(path, member.name, layer, stored)
    kind: str
    linkname = ""
    size = member.size if member.isreg() else 0
    data_offset = start + member.offset_data

    if base.startswith(WHITEOUT_PREFIX):
        if base == OPAQUE_MARKER:
            path, kind = parent, OPAQUE
        elif base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            kind = META
        else:
            target = base[len(WHITEOUT_PREFIX) :]
            if target in ("", ".", ".."):
                raise HostileEntryError(
                    f"layer {layer}: whiteout {member.name!r} names no valid entry; rejected"
                )
            path, kind = (parent.rstrip("/") + "/" + target), WHITEOUT
    elif member.issparse():
        raise ImageError(f"layer {layer}: entry {member.name!r} is a sparse file (unsupported)")
    elif member.isreg():
        kind = FILE
    elif member.isdir():
        kind = DIR
    elif member.issym():
        kind, linkname = SYMLINK, member.linkname
        if not linkname or "\x00" in linkname:
            raise HostileEntryError(
                f"layer {layer}: symlink {member.name!r} has an empty or invalid target"
            )
    elif member.islnk():
        target, _ = normalize_name(member.linkname, layer=layer, what="hardlink target of")
        original = stored.get(target)
        if original is None or original.kind not in (FILE, SYMLINK, HARDLINK):
            found = (
                "does not exist earlier in the layer"
                if original is None
                else (f"is a {original.kind}")
            )
            raise HostileEntryError(
                f"layer {layer}: hardlink {member.name!r} points to {member.linkname!r}, "
                f"which {found}; rejected"
            )
        kind, linkname = HARDLINK, target
        if original.kind == SYMLINK:
            # A hardlink to a symlink is the same symlink under a second name.
            kind, linkname = SYMLINK, original.linkname
        size, data_offset = original.size, original.data_offset
    elif member.ischr() or member.isblk() or member.isfifo():
        kind = SPECIAL
    else:
        raise ImageError(
            f"layer {layer}: entry {member.name!r} has unsupported tar type {member.type!r}"
        )

    return TarEntry(
        path=path,
        kind=kind,
        mode=member.mode & 0o7777,
        uid=member.uid,
        gid=member.gid,
        mtime=float(member.mtime),
        size=size,
        linkname=linkname,
        header_offset=start + member.offset,
        data_offset=data_offset,
        end_offset=start + end,
        name=member.name,
    )
