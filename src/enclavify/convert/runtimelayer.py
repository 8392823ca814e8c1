"""The runtime layer: the launcher, its interpreter and ``runtime.json`` under ``/opt/enclavify``.

The tree is built on disk in the scratch directory by :mod:`enclavify.runtime.builder`, which
copies the interpreter and its libraries from the image itself, or from ``--base`` when the
image has no usable Python. This module adds the settings file and the pinned CAS certificate,
and writes the tree into a layer. The measurement is taken over exactly this tree.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclavify.attest import measurement
from enclavify.attest.treehash import entry_of, tree_entries
from enclavify.image import LayerWriter, MergedFilesystem
from enclavify.runtime.builder import ImageFiles, build_runtime
from enclavify.runtime.cache import build_runtime_cached
from enclavify.runtime.config import RuntimeConfig

from .options import FSPF_PATH, RUNTIME_DIR

SETTINGS_NAME = "runtime.json"
CAS_CERTIFICATE_NAME = "cas-ca.pem"
# Same reason as for the ciphertext layer: a real time would only date the conversion.
ADDED_MTIME = 0.0


@dataclass(frozen=True)
class RuntimeSettings:
    """Launcher settings written to ``runtime.json``; sizes in bytes."""

    binary: str
    heap: int
    stack: int
    dlopen: int
    regions: Sequence[str]
    plain: Sequence[str]
    cas_address: str | None
    cas_certificate: bytes | None = field(repr=False)
    cas_fingerprint: str | None
    config_id: str | None
    user: str


@dataclass(frozen=True)
class BuiltRuntime:
    """A runtime tree on disk: ``root`` becomes ``/opt/enclavify`` in the image.

    ``info`` is the runtime part of the conversion result: version and where the interpreter
    came from. ``digest`` is the runtime digest of the measurement, over the whole tree.
    """

    root: Path
    entrypoint: list[str]
    version: str
    info: dict[str, Any]
    digest: str
    cached: bool = False


def settings_document(
    settings: RuntimeSettings, *, version: str, interpreter: dict[str, Any]
) -> dict[str, Any]:
    """Return the content of ``runtime.json``, in the launcher's own schema.

    The ``--plain`` directories are not in it: the launcher has nothing to do with them, and
    the file is part of the measurement. They are in the result and in an image label.
    """
    certificate = None
    if settings.cas_certificate is not None:
        certificate = f"{RUNTIME_DIR}/{CAS_CERTIFICATE_NAME}"
    config = RuntimeConfig(
        binary=settings.binary,
        heap=settings.heap,
        stack=settings.stack,
        dlopen=settings.dlopen,
        regions=list(settings.regions),
        fspf_path=FSPF_PATH,
        cas_address=settings.cas_address,
        cas_certificate=certificate,
        cas_fingerprint=settings.cas_fingerprint,
        config_id=settings.config_id,
        user=settings.user,
        runtime_version=version,
        interpreter=interpreter,
    )
    return config.to_json()


def write_settings(root: Path, document: dict[str, Any], cas_certificate: bytes | None) -> None:
    """Write ``runtime.json`` (and the CAS certificate, when given) into the runtime tree."""
    (root / SETTINGS_NAME).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.chmod(root / SETTINGS_NAME, 0o644)
    if cas_certificate is not None:
        (root / CAS_CERTIFICATE_NAME).write_bytes(cas_certificate)
        os.chmod(root / CAS_CERTIFICATE_NAME, 0o644)


def build(
    files: ImageFiles,
    output: Path,
    *,
    settings: RuntimeSettings,
    source: str,
    cache_dir: Path | None = None,
) -> BuiltRuntime:
    """Build the runtime tree from ``files`` into ``output`` and add ``runtime.json``.

    ``source`` names where the interpreter comes from (the image or the ``--base`` image);
    it is recorded in ``runtime.json`` and in the result. With ``cache_dir`` the tree is taken
    from the runtime cache there when an equal build is stored, and stored otherwise (see
    :mod:`enclavify.runtime.cache`); the tree is the same either way.

    Raises:
        ImageError: ``files`` has no usable Python (the message suggests ``--base``).
    """
    cached = False
    listing = None
    if cache_dir is None:
        info = build_runtime(files, output, source=source).to_json()
    else:
        built = build_runtime_cached(files, output, source=source, cache_dir=cache_dir)
        info, cached, listing = built.info.to_json(), built.cached, built.listing
    interpreter = {
        "source": info["source"],
        "path": info["interpreter"],
        "sha256": info["interpreter_sha256"],
        "python_version": info["python_version"],
        "libc": info["libc"],
        "arch": info["arch"],
    }
    version = str(info["runtime_version"])
    # The cache hashed every file of the tree while copying it, so the digest needs only its
    # listing and the settings files. Without a listing the tree is read again.
    if listing is None:
        listing = tree_entries(output)
    write_settings(
        output,
        settings_document(settings, version=version, interpreter=interpreter),
        settings.cas_certificate,
    )
    added = [SETTINGS_NAME]
    if settings.cas_certificate is not None:
        added.append(CAS_CERTIFICATE_NAME)
    entries = sorted(
        [*listing, *(entry_of(output, name) for name in added)], key=lambda entry: entry[1]
    )
    return BuiltRuntime(
        root=output,
        entrypoint=list(info["entrypoint"]),
        version=version,
        info={
            "version": version,
            "interpreter": interpreter,
            "entrypoint": list(info["entrypoint"]),
            "size": info["size"],
            "files": info["files"],
        },
        digest=measurement.entries_digest(entries),
        cached=cached,
    )


def write_layer(writer: LayerWriter, built: BuiltRuntime, filesystem: MergedFilesystem) -> None:
    """Write the runtime tree into ``writer`` under ``/opt/enclavify``, owned by root.

    ``/opt`` is added only when the image lacks it, so that an existing ``/opt`` keeps its
    owner and mode.
    """
    parent = os.path.dirname(RUNTIME_DIR)
    if filesystem.entry(parent) is None:
        writer.add_directory(parent, mode=0o755, uid=0, gid=0, mtime=ADDED_MTIME)
    writer.add_directory(RUNTIME_DIR, mode=0o755, uid=0, gid=0, mtime=ADDED_MTIME)
    for directory, dirnames, filenames in os.walk(built.root):
        dirnames.sort()
        relative_dir = os.path.relpath(directory, built.root)
        for name in sorted(dirnames) + sorted(filenames):
            host = os.path.join(directory, name)
            relative = name if relative_dir == "." else f"{relative_dir}/{name}"
            path = f"{RUNTIME_DIR}/{relative}"
            info = os.lstat(host)
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                writer.add_symlink(path, os.readlink(host), uid=0, gid=0, mtime=ADDED_MTIME)
            elif stat.S_ISDIR(info.st_mode):
                writer.add_directory(path, mode=mode, uid=0, gid=0, mtime=ADDED_MTIME)
            elif stat.S_ISREG(info.st_mode):
                with open(host, "rb") as stream:
                    writer.add_file(
                        path, stream, info.st_size, mode=mode, uid=0, gid=0, mtime=ADDED_MTIME
                    )


