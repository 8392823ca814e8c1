"""Conversion options and the checks that need no image.

:func:`check_options` normalizes and checks everything that can be checked before the source
image is opened: path syntax and overlaps, size settings, the configuration id, the CAS
certificate and where the result file goes. The checks that need the image's file system are
in :mod:`enclavify.convert.regions`.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

from enclavify.attest.measurement import (
    DLOPEN_DEFAULT,
    GIB,
    HEAP_DEFAULT,
    HEAP_MAX,
    HEAP_MIN,
    KIB,
    MIB,
    STACK_DEFAULT,
    STACK_MAX,
    STACK_MIN,
)
from enclavify.errors import CasError, UsageError
from enclavify.image.blobs import GZIP, UNCOMPRESSED
from enclavify.image.reference import REGISTRY, parse_reference

HEAP_RANGE = (HEAP_MIN, HEAP_MAX)
STACK_RANGE = (STACK_MIN, STACK_MAX)
DEFAULT_HEAP = HEAP_DEFAULT
DEFAULT_STACK = STACK_DEFAULT
# 2 lets the program load any shared library at run time. It is the default and is meant for
# debugging; like the other settings, it changes the measurement.
DEFAULT_DLOPEN = DLOPEN_DEFAULT

# Directories of the confidential image's own parts. A region must neither be nor contain them.
ENCLAVIFY_DATA_DIR = "/.enclavify"
RUNTIME_DIR = "/opt/enclavify"
FSPF_PATH = ENCLAVIFY_DATA_DIR + "/fspf"
PACK_PATH = ENCLAVIFY_DATA_DIR + "/pack"
RESERVED_DIRS = (ENCLAVIFY_DATA_DIR, RUNTIME_DIR)
# The container engine mounts kernel file systems here; their image content is never seen.
KERNEL_DIRS = ("/proc", "/sys", "/dev")

_SIZE_PATTERN = re.compile(r"([0-9]+)([kKmMgG]?)")
_SIZE_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB}
_NAME_COMPONENT = re.compile(r"[A-Za-z0-9_\-.~]{1,128}")
_CAS_ADDRESS = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def parse_size(text: str, *, option: str, bounds: tuple[int, int]) -> int:
    """Parse a size such as ``1G``, ``512m`` or ``65536`` (binary units) into bytes.

    Raises:
        UsageError: the text is not a size, or the size is outside ``bounds`` (inclusive).
    """
    match = _SIZE_PATTERN.fullmatch(text.strip())
    if match is None:
        raise UsageError(
            f"{option} {text!r} is not a size: expected digits with an optional k, m or g suffix"
        )
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    low, high = bounds
    if not low <= value <= high:
        raise UsageError(
            f"{option} {text!r} is out of range: expected {_format_size(low)} "
            f"to {_format_size(high)}"
        )
    return value


def _format_size(value: int) -> str:
    for unit, factor in (("G", GIB), ("M", MIB), ("K", KIB)):
        if value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


@dataclass(frozen=True)
class ConvertOptions:
    """Conversion request; sizes in bytes.

    ``protected`` are the directories to encrypt (``--dir``), ``plain`` the directories the
    caller states stay in the clear (``--plain``). ``cas_certificate`` is the PEM the launcher
    pins. ``result_path`` defaults to ``<safe destination name>.enclavify.json`` in the
    current directory. ``temp_dir`` is where the scratch directory is made (the system's
    default when ``None``). ``runtime_cache`` is the runtime cache's directory, ``None`` to
    build the runtime afresh without reading or writing a cache. ``compression`` is
    ``"gzip"`` or ``"none"`` for the layers the conversion writes; ``None`` chooses by
    destination (see :func:`layer_compression`).
    """

    source: str
    destination: str
    binary: str
    protected: tuple[str, ...]
    plain: tuple[str, ...] = ()
    heap: int = DEFAULT_HEAP
    stack: int = DEFAULT_STACK
    dlopen: int = DEFAULT_DLOPEN
    platform: str | None = None
    base: str | None = None
    result_path: Path | None = None
    cas_address: str | None = None
    cas_certificate: bytes | None = field(default=None, repr=False)
    config_id: str | None = None
    temp_dir: Path | None = None
    runtime_cache: Path | None = None
    compression: str | None = None


@dataclass(frozen=True)
class CheckedOptions:
    """:class:`ConvertOptions` after :func:`check_options`: paths normalized, defaults filled."""

    options: ConvertOptions
    protected: tuple[str, ...]
    plain: tuple[str, ...]
    binary: str
    result_path: Path
    cas_fingerprint: str | None
    compression: str


def safe_file_name(reference: str) -> str:
    """Turn an image reference into a file name: anything but ``[A-Za-z0-9._-]`` becomes ``_``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", reference).strip("._")
    return name or "image"


def default_result_path(destination: str, directory: Path | None = None) -> Path:
    """Return ``<safe destination name>.enclavify.json`` in ``directory`` (the current one)."""
    return (directory or Path.cwd()) / f"{safe_file_name(destination)}.enclavify.json"


def normalize_image_path(text: str, *, option: str) -> str:
    """Normalize an absolute path inside the image (``/app/`` becomes ``/app``).

    Raises:
        UsageError: the path is empty, relative, or contains a NUL byte.
    """
    if not text or "\x00" in text:
        raise UsageError(f"{option} {text!r} is not a path")
    if not text.startswith("/"):
        raise UsageError(f"{option} {text!r} is not absolute: paths inside the image start with /")
    normalized = posixpath.normpath(text)
    # POSIX keeps a leading "//"; inside an image it means "/".
    if normalized.startswith("//"):
        normalized = "/" + normalized.lstrip("/")
    return normalized


def is_within(path: str, directory: str) -> bool:
    """Tell whether ``path`` is ``directory`` or below it (both normalized and absolute)."""
    if directory == "/":
        return True
    return path == directory or path.startswith(directory + "/")


def _check_region(path: str, *, option: str) -> None:
    if path == "/":
        raise UsageError(f"{option} /: the whole image cannot be one region; name its directories")
    for reserved in RESERVED_DIRS:
        if is_within(path, reserved) or is_within(reserved, path):
            raise UsageError(
                f"{option} {path!r} overlaps {reserved}, which contains the confidential "
                f"image's own files"
            )
    for kernel in KERNEL_DIRS:
        if is_within(path, kernel):
            raise UsageError(
                f"{option} {path!r} is under {kernel}, where the container engine mounts a "
                f"kernel file system"
            )


def _collapse_nested(paths: list[str]) -> tuple[str, ...]:
    """Drop duplicates and directories already inside another one of the list."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(is_within(path, outer) for outer in kept):
            kept.append(path)
    return tuple(kept)


def check_config_id(config_id: str) -> None:
    """Check the ``NAMESPACE/SESSION/SERVICE`` form (the session is all before the last ``/``).

    Raises:
        UsageError: the id has fewer than two components or a component is not a valid name.
    """
    components = config_id.split("/")
    if len(components) < 2:
        raise UsageError(
            f"--config-id {config_id!r} is not SESSION/SERVICE: expected at least one '/'"
        )
    for component in components:
        if not _NAME_COMPONENT.fullmatch(component):
            raise UsageError(
                f"--config-id {config_id!r}: component {component!r} is not a valid name "
                f"(letters, digits and _-.~, 1 to 128 characters)"
            )


def certificate_fingerprint(pem: bytes) -> str:
    """Return the pin of ``pem``: the hex SHA-256 of the DER form of its one certificate.

    The launcher's CAS client computes the same pin, and it trusts every certificate in a
    pinned PEM, so a PEM with more than one block is rejected.

    Raises:
        UsageError: ``pem`` is not exactly one parseable X.509 certificate.
    """
    # Imported here because only a conversion with --cas-cert needs them. cryptography's x509
    # module takes about 20 ms to import and the CAS client (with ssl and socket) about 10 ms.
    from cryptography import x509  # noqa: PLC0415

    from enclavify.cas.client import pem_fingerprint  # noqa: PLC0415

    try:
        x509.load_pem_x509_certificate(pem)
        return pem_fingerprint(pem)
    except (ValueError, CasError) as error:
        raise UsageError(f"--cas-cert is not a PEM X.509 certificate: {error}") from error


def _check_result_path(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"--result {str(path)!r} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path.cwd()
    if not parent.is_dir():
        raise UsageError(f"--result {str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--result {str(path)!r}: directory {str(parent)!r} is not writable")


def layer_compression(destination: str, requested: str | None) -> str:
    """Return the compression of the layers a conversion writes to ``destination``.

    Unless ``requested``, they are gzip for a registry and plain tars elsewhere, as buildah
    writes them. Engines and docker archives store layers uncompressed, so gzip there would
    be undone at once, and ``skopeo copy`` compresses the plain layers of an OCI layout or
    archive when it pushes them to a registry. Rewritten layers are most of an image:
    compressing the 93 MiB left of a Debian base layer took 0.25 s of one core, the longest
    step of its conversion.

    Raises:
        UsageError: ``requested`` is neither ``"gzip"`` nor ``"none"``, or ``destination``
            is malformed.
    """
    if requested is not None and requested not in (GZIP, UNCOMPRESSED):
        raise UsageError(f"--compression {requested!r} is invalid: expected gzip or none")
    transport = parse_reference(destination).transport
    if requested is not None:
        return requested
    return GZIP if transport == REGISTRY else UNCOMPRESSED


def check_options(options: ConvertOptions) -> CheckedOptions:
    """Check and normalize what can be checked without opening an image.

    Raises:
        UsageError: a path is malformed or reserved, a ``--dir`` overlaps a ``--plain``, a
            size or the dlopen setting is out of range, the configuration id, CAS address or
            certificate is malformed, the destination or compression is malformed, or the
            result file cannot be written.
    """
    if not options.protected:
        raise UsageError("no --dir given: name at least one directory to protect")
    protected = [normalize_image_path(path, option="--dir") for path in options.protected]
    for path in protected:
        _check_region(path, option="--dir")
    plain = [normalize_image_path(path, option="--plain") for path in options.plain]
    for path in plain:
        if path == "/":
            raise UsageError("--plain /: the whole image cannot be left in the clear")
    for region in protected:
        for clear in plain:
            if is_within(region, clear) or is_within(clear, region):
                raise UsageError(
                    f"--dir {region!r} overlaps --plain {clear!r}: a directory is either "
                    f"protected or in the clear"
                )
    binary = normalize_image_path(options.binary, option="--binary")

    low, high = HEAP_RANGE
    if not low <= options.heap <= high:
        raise UsageError(f"heap size {options.heap} bytes is out of range ({low} to {high})")
    low, high = STACK_RANGE
    if not low <= options.stack <= high:
        raise UsageError(f"stack size {options.stack} bytes is out of range ({low} to {high})")
    if options.dlopen not in (0, 1, 2):
        raise UsageError(f"--dlopen {options.dlopen!r} is invalid: expected 0, 1 or 2")

    if options.config_id is not None:
        check_config_id(options.config_id)
    if options.cas_address is not None and not _CAS_ADDRESS.fullmatch(options.cas_address):
        raise UsageError(f"--cas {options.cas_address!r} is not HOST or HOST:PORT")
    fingerprint = None
    if options.cas_certificate is not None:
        fingerprint = certificate_fingerprint(options.cas_certificate)

    compression = layer_compression(options.destination, options.compression)
    result_path = options.result_path or default_result_path(options.destination)
    _check_result_path(result_path)
    if options.temp_dir is not None and not options.temp_dir.is_dir():
        raise UsageError(f"temporary directory {str(options.temp_dir)!r} does not exist")

    return CheckedOptions(
        options=options,
        protected=_collapse_nested(protected),
        plain=_collapse_nested(plain),
        binary=binary,
        result_path=result_path,
        cas_fingerprint=fingerprint,
        compression=compression,
    )
