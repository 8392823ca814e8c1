"""The merged file system of an image: its layers applied in order, read without extraction.

Layers are applied as overlay file systems apply them: an entry in an upper layer hides the
same path below; a directory over a directory merges their contents; a whiteout
(``.wh.NAME``) deletes ``NAME`` and everything under it from the layers below; an opaque
marker (``.wh..wh..opq``) hides everything the layers below have in that directory. An entry
whose parent is not a directory in the view below (a symlink, say) makes that parent a
directory, because each layer is unpacked on its own and then stacked, not unpacked through
the links of the layers below.

File content stays in the uncompressed layer tars; :meth:`open` returns a stream over the
file's bytes in place.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from enclavify.errors import ImageError
from enclavify.image import tarindex
from enclavify.image.blobs import open_slice

log = logging.getLogger(__name__)

MAX_SYMLINK_HOPS = 40  # Linux's limit for one path lookup (ELOOP)

_TYPES = {
    tarindex.FILE: "file",
    tarindex.DIR: "dir",
    tarindex.SYMLINK: "symlink",
    tarindex.HARDLINK: "hardlink",
}


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One entry of the merged view.

    ``type`` is ``file``, ``dir``, ``symlink`` or ``hardlink``; ``mode`` contains the permission
    bits (including setuid, setgid and sticky); ``linkname`` is the symlink target as stored,
    or for a hardlink the absolute path of the file it shares content with (a hardlink whose
    target is no longer that same file in the merged view is reported as a ``file``).
    ``layer`` is the index of the layer the entry comes from (-1 for the root and for
    directories created implicitly).
    """

    path: str
    type: str
    mode: int
    uid: int
    gid: int
    mtime: float
    size: int = 0
    linkname: str = ""
    layer: int = -1
    data_path: Path | None = field(default=None, repr=False, compare=False)
    data_offset: int = field(default=0, repr=False, compare=False)


class _Node:
    __slots__ = ("children", "entry")

    def __init__(self, entry: FileEntry) -> None:
        self.entry = entry
        self.children: dict[str, _Node] | None = {} if entry.type == "dir" else None


def split_path(path: str) -> list[str]:
    """Return the components of an absolute image path, rejecting relative ones."""
    if not path.startswith("/"):
        raise ValueError(f"image paths are absolute, got {path!r}")
    return [part for part in path.split("/") if part not in ("", ".")]


class MergedFilesystem:
    """The final tree of an image (see the module documentation for the merge rules)."""

    def __init__(self) -> None:
        self._root = _Node(FileEntry("/", "dir", 0o755, 0, 0, 0.0))
        self._layer_identities: list[tuple[str, int]] | None = None
        self._check_sources: Callable[[], None] | None = None

    @classmethod
    def from_layers(
        cls,
        layers: Sequence[tuple[Path, Sequence[tarindex.TarEntry]]],
        *,
        identities: Sequence[tuple[str, int]] | None = None,
        check_sources: Callable[[], None] | None = None,
    ) -> MergedFilesystem:
        """Build the view from ``(uncompressed tar path, index)`` pairs, lowest layer first.

        ``identities`` gives each layer's verified diff_id and where its tar starts in its
        file, so that :meth:`content_key` can name a file's bytes. ``check_sources`` raises
        ImageError if a tar file changed since it was verified (see :meth:`sources_unchanged`).
        """
        view = cls()
        if identities is not None:
            if len(identities) != len(layers):
                raise ValueError(f"{len(identities)} identities for {len(layers)} layers")
            view._layer_identities = list(identities)
        view._check_sources = check_sources
        for number, (tar_path, entries) in enumerate(layers):
            view._apply_layer(number, tar_path, entries)
        view._downgrade_broken_hardlinks()
        return view

    # -- building ------------------------------------------------------------------------

    def _apply_layer(
        self, number: int, tar_path: Path, entries: Sequence[tarindex.TarEntry]
    ) -> None:
        # Whiteouts and opaque markers act on the layers below only, whatever their position
        # in this layer's tar, so they are applied before this layer's own entries.
        for item in entries:
            if item.kind == tarindex.WHITEOUT:
                parent = self._node(split_path(item.path)[:-1])
                if parent is not None and parent.children is not None:
                    parent.children.pop(item.path.rsplit("/", 1)[1], None)
            elif item.kind == tarindex.OPAQUE:
                node = self._node(split_path(item.path))
                if node is not None and node.children is not None:
                    node.children.clear()
        for item in entries:
            kind = _TYPES.get(item.kind)
            if kind is None:
                continue
            parts = split_path(item.path)
            parent = self._make_parents(parts[:-1], number)
            assert parent.children is not None
            entry = FileEntry(
                path=item.path,
                type=kind,
                mode=item.mode,
                uid=item.uid,
                gid=item.gid,
                mtime=item.mtime,
                size=item.size,
                linkname=item.linkname,
                layer=number,
                data_path=tar_path if kind in ("file", "hardlink") else None,
                data_offset=item.data_offset,
            )
            existing = parent.children.get(parts[-1])
            if existing is not None and existing.entry.type == "dir" and kind == "dir":
                existing.entry = entry  # a directory over a directory merges their contents
            else:
                parent.children[parts[-1]] = _Node(entry)

    def _make_parents(self, parts: list[str], layer: int) -> _Node:
        node = self._root
        for depth, part in enumerate(parts):
            assert node.children is not None
            child = node.children.get(part)
            if child is None or child.children is None:
                path = "/" + "/".join(parts[: depth + 1])
                if child is not None:
                    log.warning(
                        "layer %d puts entries below %s, a %s in a lower layer; it becomes a "
                        "directory, as with the overlay storage driver",
                        layer,
                        path,
                        child.entry.type,
                    )
                child = _Node(FileEntry(path, "dir", 0o755, 0, 0, 0.0))
                node.children[part] = child
            node = child
        return node

    def _downgrade_broken_hardlinks(self) -> None:
        for node in self._nodes_under(self._root):
            entry = node.entry
            if entry.type != "hardlink":
                continue
            target = self._node(split_path(entry.linkname))
            same_file = (
                target is not None
                and target.entry.type in ("file", "hardlink")
                and target.entry.data_path == entry.data_path
                and target.entry.data_offset == entry.data_offset
            )
            if not same_file:
                node.entry = FileEntry(
                    entry.path,
                    "file",
                    entry.mode,
                    entry.uid,
                    entry.gid,
                    entry.mtime,
                    entry.size,
                    "",
                    entry.layer,
                    entry.data_path,
                    entry.data_offset,
                )

    # -- lookups -------------------------------------------------------------------------

    def _node(self, parts: Sequence[str]) -> _Node | None:
        node = self._root
        for part in parts:
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def _nodes_under(self, top: _Node) -> Iterator[_Node]:
        stack = [top]
        while stack:
            node = stack.pop()
            yield node
            if node.children:
                stack.extend(node.children[name] for name in sorted(node.children, reverse=True))

    def entry(self, path: str) -> FileEntry | None:
        """Return the entry at ``path`` itself, following no symlink, or ``None``."""
        node = self._node(split_path(path))
        return node.entry if node is not None else None

    def resolve(self, path: str, *, follow_final: bool = True) -> str | None:
        """Return the canonical path ``path`` leads to, following symlinks inside the image.

        Absolute link targets start at the image root and ``..`` stops at the root, as in a
        chroot, so the result is always inside the image. Returns ``None`` when a component
        does not exist or a non-final component is not a directory.

        Raises:
            ImageError: more than 40 symlinks are followed (a loop).
        """
        pending = deque(split_path(path))
        nodes: list[_Node] = [self._root]
        names: list[str] = []
        hops = 0
        while pending:
            part = pending.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if names:
                    names.pop()
                    nodes.pop()
                continue
            current = nodes[-1]
            if current.children is None:
                return None
            child = current.children.get(part)
            if child is None:
                return None
            if child.entry.type == "symlink" and (pending or follow_final):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise ImageError(
                        f"too many levels of symbolic links resolving {path!r} in the image"
                    )
                target = child.entry.linkname
                if target.startswith("/"):
                    names.clear()
                    del nodes[1:]
                pending.extendleft(reversed(target.split("/")))
                continue
            names.append(part)
            nodes.append(child)
        return "/" + "/".join(names)

    def open(self, path: str) -> BinaryIO:
        """Open the regular file at ``path`` (symlinks followed) for reading.

        Raises:
            ImageError: the path does not exist or is not a regular file.
        """
        resolved = self.resolve(path)
        node = self._node(split_path(resolved)) if resolved is not None else None
        if node is None:
            raise ImageError(f"{path!r} does not exist in the image")
        entry = node.entry
        if entry.type not in ("file", "hardlink") or entry.data_path is None:
            raise ImageError(f"{path!r} is a {entry.type} in the image, not a regular file")
        return open_slice(entry.data_path, entry.data_offset, entry.size)

    def content_key(self, path: str) -> str | None:
        """Return a name for the bytes :meth:`open` reads at ``path``, or ``None``.

        The name is the layer's diff_id with the file's offset and size in that layer's tar:
        the diff_id fixes every byte of the tar, so equal names mean equal content. It lets
        the runtime cache recognise a file it has hashed before without reading it again.
        ``None`` when the view was built without identities or ``open`` would raise.
        """
        if self._layer_identities is None:
            return None
        try:
            resolved = self.resolve(path)
        except ImageError:
            return None
        node = self._node(split_path(resolved)) if resolved is not None else None
        if node is None:
            return None
        entry = node.entry
        if entry.type not in ("file", "hardlink") or entry.data_path is None or entry.layer < 0:
            return None
        diff_id, tar_offset = self._layer_identities[entry.layer]
        return f"{diff_id}@{entry.data_offset - tar_offset}+{entry.size}"

    def sources_unchanged(self) -> bool:
        """Return whether every layer tar still is the file that was verified.

        A name from :meth:`content_key` stands for the verified bytes, so what was read from
        a file changed in the meantime must not be remembered under it.
        """
        if self._check_sources is None:
            return True
        try:
            self._check_sources()
        except ImageError:
            return False
        return True

    def read_bytes(self, path: str) -> bytes:
        """Return the whole content of a (small) regular file."""
        with self.open(path) as stream:
            return stream.read()

    def walk(self, top: str = "/") -> Iterator[FileEntry]:
        """Yield ``top`` and everything under it, directories before their contents.

        Symlinks, ``top`` included, are reported as entries and not followed; names are
        visited in sorted order. Nothing is yielded when ``top`` does not exist.
        """
        node = self._node(split_path(top))
        if node is None:
            return
        for item in self._nodes_under(node):
            yield item.entry

    def listdir(self, path: str) -> list[str]:
        """Return the sorted names in the directory ``path`` (symlinks followed).

        Raises:
            ImageError: the path does not exist or is not a directory.
        """
        resolved = self.resolve(path)
        node = self._node(split_path(resolved)) if resolved is not None else None
        if node is None:
            raise ImageError(f"{path!r} does not exist in the image")
        if node.children is None:
            raise ImageError(f"{path!r} is a {node.entry.type} in the image, not a directory")
        return sorted(node.children)
