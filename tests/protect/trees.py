"""Building test trees, snapshotting them, and sealing fspfs by hand for hostile cases."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclavify.protect.format import CHUNK_SIZE, FSPF_HEADER

IS_ROOT = os.geteuid() == 0

# Float seconds cannot carry every nanosecond, so mtimes match to within a microsecond.
MTIME_TOLERANCE_NS = 1000


@dataclass
class Node:
    """One entry of a test tree, relative to the tree's root."""

    kind: str  # "file", "dir", "symlink", "hardlink"
    mode: int = 0o644
    content: bytes = b""
    target: str = ""
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 1_700_000_000_123_456_000
    children: dict[str, Node] = field(default_factory=dict)


def build(path: Path, node: Node) -> None:
    """Create ``node`` at ``path``, children first, then metadata so mtimes stick."""
    if node.kind == "dir":
        path.mkdir(exist_ok=True)
        for name, child in node.children.items():
            build(path / name, child)
    elif node.kind == "file":
        path.write_bytes(node.content)
    elif node.kind == "symlink":
        os.symlink(node.target, path)
    elif node.kind == "hardlink":
        os.link(path.parent / node.target, path)
        return
    set_metadata(path, node)


def set_metadata(path: Path, node: Node) -> None:
    if IS_ROOT:
        os.chown(path, node.uid, node.gid, follow_symlinks=False)
    if node.kind != "symlink":
        os.chmod(path, node.mode)
    os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)


def write_streaming(path: Path, size: int, seed: bytes = b"seed") -> str:
    """Write ``size`` pseudo-random bytes a MiB at a time; return their SHA-256."""
    digest = hashlib.sha256()
    block = hashlib.sha512(seed).digest() * (1 << 14)  # 1 MiB
    counter = 0
    with open(path, "wb") as sink:
        remaining = size
        while remaining:
            piece = block[: min(len(block), remaining)]
            # Vary each MiB so that swapped or repeated chunks could not go unnoticed.
            piece = counter.to_bytes(8, "big") + piece[8:] if len(piece) >= 8 else piece
            sink.write(piece)
            digest.update(piece)
            remaining -= len(piece)
            counter += 1
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while True:
            block = stream.read(1 << 20)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Describe every entry under ``root`` (itself included as ``.``) for comparison."""
    result: dict[str, dict[str, Any]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}

    def visit(path: Path, relative: str) -> None:
        info = os.lstat(path)
        record: dict[str, Any] = {
            "uid": info.st_uid,
            "gid": info.st_gid,
            "mtime_us": round(info.st_mtime_ns / MTIME_TOLERANCE_NS),
        }
        if stat.S_ISDIR(info.st_mode):
            record.update(type="dir", mode=oct(stat.S_IMODE(info.st_mode)))
            for name in sorted(os.listdir(path)):
                visit(path / name, f"{relative}/{name}")
        elif stat.S_ISLNK(info.st_mode):
            record.update(type="symlink", target=os.readlink(path))
        elif stat.S_ISREG(info.st_mode):
            record.update(
                type="file",
                mode=oct(stat.S_IMODE(info.st_mode)),
                size=info.st_size,
                sha256=file_digest(path),
            )
            inodes.setdefault((info.st_dev, info.st_ino), []).append(relative)
        else:
            record.update(type="other")
        result[relative] = record

    visit(root, ".")
    for paths in inodes.values():
        for path in paths:
            result[path]["links"] = sorted(paths)
    return result


def assert_same_tree(expected: Path, actual: Path) -> None:
    left = snapshot(expected)
    right = snapshot(actual)
    assert sorted(left) == sorted(right)
    for path in left:
        record, other = left[path], right[path]
        # Rounding to microseconds can split two values a few ns apart across a boundary.
        assert abs(record.pop("mtime_us") - other.pop("mtime_us")) <= 1, path
        assert record == other, path


def seal_object(key: bytes, file_id: bytes, data: bytes, chunk_size: int = CHUNK_SIZE) -> bytes:
    """Seal ``data`` as an object exactly as the format describes, independent of the code."""
    cipher = AESGCM(key)
    pieces = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    sealed = []
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        nonce = bytes(4) + index.to_bytes(8, "big")
        aad = b"enclavify-chunk-v1" + file_id + index.to_bytes(8, "big") + bytes([last])
        sealed.append(cipher.encrypt(nonce, piece, aad))
    return b"".join(sealed)


# The types of entries, numbered as the manifest stores them.
ENTRY_CODES = {"dir": 0, "file": 1, "symlink": 2, "hardlink": 3}


def encode_manifest(document: dict[str, Any]) -> bytes:
    """Encode a manifest document as the format describes, independently of the code.

    ``document`` has ``format``, ``chunk_size``, ``regions`` and ``entries``: dictionaries
    with ``type`` (a name or a number), ``path`` and ``target`` (text or bytes), ``mode``,
    ``uid``, ``gid``, ``mtime`` and ``size`` (0 when missing), and for a file ``key`` and
    ``file_id`` in hex. Values are packed as given, so that a test can write what the sealer
    never would. ``entry_count``, when present, replaces the number of entries in the header.
    """
    entries = document["entries"]
    header = {
        name: value for name, value in document.items() if name not in ("entries", "entry_count")
    }
    header["entries"] = document.get("entry_count", len(entries))
    records = b""
    names = b""
    for entry in entries:
        kind = entry.get("type", "file")
        path, target = (
            text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
            for text in (entry.get("path", ""), entry.get("target", ""))
        )
        records += struct.pack(
            "<HHIIdQII", ENTRY_CODES.get(kind, kind), entry.get("mode", 0), entry.get("uid", 0),
            entry.get("gid", 0), entry.get("mtime", 0.0), entry.get("size", 0), len(path),
            len(target),
        )
        names += path + target
        if kind == "file":
            names += bytes.fromhex(entry["key"]) + bytes.fromhex(entry["file_id"])
    line = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return line + b"\n" + records + names


def seal_manifest(document: dict[str, Any], key: bytes, header: bytes = FSPF_HEADER) -> bytes:
    """Encrypt a manifest document (see :func:`encode_manifest`) into an fspf."""
    nonce = os.urandom(12)
    plaintext = encode_manifest(document)
    return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header)
