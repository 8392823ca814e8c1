"""A cache of built runtimes, so that converting images with the same Python builds it once.

A runtime depends on two things. One is what the builder reads from the image: the results of
its ``entry``, ``resolve``, ``open``, ``listdir`` and ``walk`` calls. The other is what it takes
from this machine: the carried enclavify modules, the Python that lists the launcher's imports
and compiles the bytecode, and the builder itself. The cache is keyed by both:

    <cache>/runtime/lookups/<host key>/<calls digest>.json
        the distinct calls a build made, sorted, for each kind of image seen with this host key
    <cache>/runtime/<key>/entry.json
        the build's :class:`RuntimeInfo` (without ``source``) and the digest of the tree
    <cache>/runtime/<key>/tree/
        the runtime as the builder left it, before ``runtime.json`` is added
    <cache>/runtime/contents.json
        the SHA-256 of image files already read, by content key (see below)

The host key covers the enclavify version, the code of the builder and of this module, the
host Python (version, build, executable and standard library directory), the platform, the
cache format and the ``python`` option. A build's call list also lists the carried enclavify
modules (``source``, their content) and the package directories on the way to them
(``package``, the modules and subpackages they contain), so editing the launcher or adding a
module it may import gives a fresh runtime, while editing the CAS server does not.

A lookup replays each recorded call list; ``<key>`` hashes the host key with the results'
fingerprints (file contents as SHA-256). The builder decides what to call next only from
earlier results, so equal results mean the same calls (perhaps in another order, as it walks
sets) and the same output. The image's other files (an application layer that changed) do
not count.

An image's merged view names a file's bytes by its layer's verified diff_id and the file's
place in that layer's tar (``content_key``). A replay looks an ``open`` call's fingerprint up
by that name and reads the file only when the name is new. For a Debian base image that
skips reading and hashing 17 MiB: the runtime step took 0.05 s instead of 0.13 s.
A damaged digest in ``contents.json`` gives a fingerprint that matches no entry, so the
runtime is built again, as if the file had changed. Digests read from a layer file that
changed after its check are not kept (``sources_unchanged``). Like the entries, the file is
trusted as far as the cache directory is.

Entries are written under a temporary name and renamed into place: a second writer that loses
the race drops its copy. Every use checks the tree against the stored digest while it links
or copies it out; a damaged or incomplete entry is removed and the runtime built again. The
cache keeps the :data:`MAX_ENTRIES` most recently used entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from enclavify import __version__, atomic
from enclavify.errors import ImageError

from . import builder
from .builder import ImageFiles, RuntimeInfo, build_runtime

if TYPE_CHECKING:
    from enclavify.attest.treehash import TreeEntry

log = logging.getLogger(__name__)

# Raise when the layout of an entry or the meaning of a recorded call changes.
FORMAT_VERSION = 1
MAX_ENTRIES = 8
MAX_LOOKUPS = 8
# Content digests kept in contents.json; a Debian base image's runtime reads about 90 files.
MAX_CONTENT_DIGESTS = 20_000
_ENTRY_FILE = "entry.json"
_TREE_DIR = "tree"
_CONTENTS_FILE = "contents.json"


@dataclass(frozen=True)
class CachedBuild:
    """The result of :func:`build_runtime_cached`: the runtime's summary and where it came from.

    ``listing`` is the tree as :func:`enclavify.attest.treehash.tree_entries` lists it. It is
    taken from the files as they were read while copying them to or from the cache, so the
    runtime digest needs no second read of the tree. It is None when no copy was made, because
    the cache could not be written or already had the entry.
    """

    info: RuntimeInfo
    cached: bool
    listing: list[TreeEntry] | None = field(default=None, repr=False)


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/enclavify/runtime`` (``~/.cache`` when unset or relative)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "enclavify" / "runtime"


def build_runtime_cached(
    files: ImageFiles,
    output: Path,
    *,
    source: str,
    cache_dir: Path,
    python: str | None = None,
) -> CachedBuild:
    """Put the runtime for ``files`` into the new directory ``output``, from the cache if it can.

    Same contract as :func:`enclavify.runtime.builder.build_runtime`; ``cache_dir`` is the
    cache's directory (see :func:`default_cache_dir`). A cache that cannot be read or written
    only costs the build, and is never an error.
    """
    if output.exists():
        raise ImageError(f"runtime output directory {str(output)!r} already exists")
    host_key = _host_key(python)
    lookups = cache_dir / "lookups" / host_key
    contents = _ContentDigests(cache_dir / _CONTENTS_FILE)
    for calls_file in _newest_first(lookups, suffix=".json"):
        try:
            calls = json.loads(calls_file.read_text())
            key = _entry_key(host_key, _replay(files, calls, contents))
        except (OSError, ValueError, TypeError) as error:
            log.debug("runtime cache: unusable call list %s (%s); skipped", calls_file, error)
            continue
        from_cache = _take(cache_dir / key, output, source=source)
        if from_cache is not None:
            log.debug("runtime cache: using %s", cache_dir / key)
            _touch(calls_file)
            _touch(lookups)
            contents.save(files)
            return CachedBuild(from_cache[0], cached=True, listing=from_cache[1])

    recorder = _Recorder(files, contents)
    info = build_runtime(recorder, output, python=python, source=source)
    calls = recorder.calls + _source_calls(output)
    fingerprints = recorder.fingerprints + _replay(files, calls[len(recorder.calls) :], contents)
    if not _carried_as_read(output, fingerprints):
        # An enclavify module changed while the build read it: the tree may mix both versions.
        log.debug("runtime cache: enclavify's sources changed during the build; not stored")
        return CachedBuild(info, cached=False)
    key = _entry_key(host_key, fingerprints)
    listing = None
    try:
        listing = _store(cache_dir, key, output, info)
        _write_atomic(lookups, calls)
        _prune(cache_dir, lookups.parent)
        contents.save(files)
    except (OSError, ValueError) as error:
        log.debug("runtime cache: not stored in %s (%s)", cache_dir, error)
    return CachedBuild(info, cached=False, listing=listing)


# -- the key -------------------------------------------------------------------------------


def _host_key(python: str | None) -> str:
    """Digest of what a build takes from this machine, apart from the carried modules."""
    stdlib = Path(os.__file__).parent
    executable = Path(sys.executable).resolve()
    described = {
        "format": FORMAT_VERSION,
        "enclavify": __version__,
        "code": _OWN_CODE,
        "python": sys.version,
        "cache_tag": sys.implementation.cache_tag,
        "executable": [str(executable), *_stat_key(executable)],
        "stdlib": [str(stdlib), *_stat_key(stdlib)],
        "machine": platform.machine(),
        "libc": list(platform.libc_ver()),
        "option_python": python,
    }
    return _digest(described)


def _code_digest() -> str:
    """Digest of the builder and this module as this process loaded them."""
    digest = hashlib.sha256()
    for path in (Path(builder.__file__), Path(__file__)):
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


_OWN_CODE = _code_digest()


def _source_calls(output: Path) -> list[list[str]]:
    """Return the calls that represent the carried enclavify modules of the runtime at ``output``.

    Each carried module's source counts, and so do the names in each package directory on
    the way to it. A module added there can make an optional import succeed, which changes
    what importing the launcher pulls in and so the standard library modules carried.
    """
    calls: list[list[str]] = []
    packages = {"enclavify"}
    for carried in sorted((output / "lib").glob("python*/enclavify")):
        for path in sorted(carried.rglob("*.py")):
            relative = path.relative_to(carried.parent)
            calls.append(["source", relative.as_posix()])
            packages.update(parent.as_posix() for parent in relative.parents if parent.parts)
    return calls + [["package", name] for name in sorted(packages)]


def _carried_as_read(output: Path, fingerprints: list[Any]) -> bool:
    """Return whether each carried module in ``output`` equals the source file now."""
    for op, path, fingerprint in fingerprints:
        if op != "source":
            continue
        copies = list((output / "lib").glob(f"python*/{path}"))
        if len(copies) != 1 or hashlib.sha256(copies[0].read_bytes()).hexdigest() != fingerprint:
            return False
    return True


def _stat_key(path: Path) -> list[int]:
    try:
        info = os.stat(path)
    except OSError:
        return [-1, -1]
    return [info.st_size, info.st_mtime_ns]


def _entry_key(host_key: str, fingerprints: list[Any]) -> str:
    # Sorted: the builder walks sets of module names, so two runs of the same build can make
    # the same calls in another order.
    return _digest([host_key, sorted(fingerprints, key=lambda item: (item[0], item[1]))])


def _digest(value: Any) -> str:
    encoded = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()


# -- recording and replaying what the builder reads ----------------------------------------


def _describe(entry: Any) -> list[Any] | None:
    if entry is None:
        return None
    return [entry.path, entry.type, entry.mode, entry.size, entry.linkname]


def _perform(files: ImageFiles, op: str, path: str) -> Any:
    """Make one call on ``files``; an error it raises is returned, to be raised later.

    ``source`` and ``package`` calls read the enclavify source tree the runtime carries:
    a file's content and a package directory's module and subpackage names.
    """
    try:
        if op == "source":
            return _source_path(path).read_bytes()
        if op == "package":
            directory = _source_path(path)
            return sorted(
                name
                for name in os.listdir(directory)
                if name.endswith(".py") or (directory / name / "__init__.py").is_file()
            )
        if op == "entry":
            return files.entry(path)
        if op == "resolve":
            return files.resolve(path)
        if op == "listdir":
            return files.listdir(path)
        if op == "walk":
            return list(files.walk(path))
        if op == "open":
            with files.open(path) as stream:
                return stream.read()
    except (ImageError, OSError) as error:
        return error
    raise ValueError(f"unknown recorded call {op!r}")


def _fingerprint(op: str, result: Any) -> Any:
    """Return the fingerprint of a call's result for the key: JSON, file content as SHA-256."""
    if isinstance(result, BaseException):
        return ["raises", type(result).__name__, str(result)]
    if op == "entry":
        return _describe(result)
    if op == "walk":
        return [_describe(entry) for entry in result]
    if op in ("open", "source"):
        return hashlib.sha256(result).hexdigest()
    return result


def _source_path(relative: str) -> Path:
    parts = relative.split("/")
    if parts[0] != "enclavify" or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"recorded source {relative!r} is not below the enclavify package")
    return builder.SOURCE_ROOT.joinpath(*parts)


def _replay(files: ImageFiles, calls: list[list[str]], contents: _ContentDigests) -> list[Any]:
    fingerprints = []
    for recorded_op, recorded_path in calls:
        op, path = str(recorded_op), str(recorded_path)
        known = contents.lookup(files, path) if op == "open" else None
        if known is None:
            result = _perform(files, op, path)
            known = _fingerprint(op, result)
            if op == "open" and not isinstance(result, BaseException):
                contents.remember(files, path, known)
        fingerprints.append([op, path, known])
    return fingerprints


class _ContentDigests:
    """The SHA-256 of image files by content key, kept in ``contents.json`` between builds.

    The file is a JSON object from content key to hex digest. One that cannot be read or
    parsed counts as empty; saving writes a new file under a temporary name and renames it.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._known: dict[str, str] = {}
        self._added: dict[str, str] = {}
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(loaded, dict):
            self._known = {
                key: value
                for key, value in loaded.items()
                if isinstance(key, str) and isinstance(value, str)
            }

    def lookup(self, files: ImageFiles, path: str) -> str | None:
        key = _content_key(files, path)
        return None if key is None else self._known.get(key)

    def remember(self, files: ImageFiles, path: str, digest: str) -> None:
        key = _content_key(files, path)
        if key is not None and self._known.get(key) != digest:
            self._known[key] = self._added[key] = digest

    def save(self, files: ImageFiles) -> None:
        """Write the digests added since loading, with those another build wrote meanwhile.

        Nothing is written if one of the files behind ``files`` changed since it was verified:
        what was read from it may not be the bytes its content key stands for.
        """
        if not self._added:
            return
        sources_unchanged = getattr(files, "sources_unchanged", None)
        if sources_unchanged is not None and not sources_unchanged():
            log.debug("runtime cache: the image's files changed; their digests are not kept")
            return
        merged = _ContentDigests(self._path)._known
        merged.update(self._added)
        # The oldest go first: a dict keeps insertion order, and new ones were added last.
        newest = dict(list(merged.items())[-MAX_CONTENT_DIGESTS:])
        encoded = json.dumps(newest, separators=(",", ":")).encode()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(self._path, encoded, mode=0o600, sync=False)
        except OSError as error:
            log.debug("runtime cache: %s not written (%s)", self._path, error)
            return
        self._added.clear()


def _content_key(files: ImageFiles, path: str) -> str | None:
    # A host directory (DirectoryFiles) has no such names: its files are read every time.
    content_key = getattr(files, "content_key", None)
    return None if content_key is None else content_key(path)


class _Recorder:
    """An :class:`ImageFiles` that notes each distinct call and its fingerprint."""

    def __init__(self, files: ImageFiles, contents: _ContentDigests) -> None:
        self._files = files
        self._contents = contents
        self._seen: set[tuple[str, str]] = set()
        self.calls: list[list[str]] = []
        self.fingerprints: list[Any] = []

    def _record(self, op: str, path: str) -> Any:
        result = _perform(self._files, op, path)
        if (op, path) not in self._seen:
            self._seen.add((op, path))
            self.calls.append([op, path])
            fingerprint = _fingerprint(op, result)
            self.fingerprints.append([op, path, fingerprint])
            if op == "open" and not isinstance(result, BaseException):
                self._contents.remember(self._files, path, fingerprint)
        if isinstance(result, BaseException):
            raise result
        return result

    def entry(self, path: str) -> Any:
        return self._record("entry", path)

    def resolve(self, path: str) -> str | None:
        resolved: str | None = self._record("resolve", path)
        return resolved

    def open(self, path: str) -> IO[bytes]:
        data: bytes = self._record("open", path)
        return io.BytesIO(data)

    def walk(self, top: str) -> Iterator[Any]:
        entries: list[Any] = self._record("walk", top)
        return iter(entries)

    def listdir(self, path: str) -> list[str]:
        names: list[str] = self._record("listdir", path)
        return list(names)


# -- entries -------------------------------------------------------------------------------


def _take(
    entry: Path, output: Path, *, source: str
) -> tuple[RuntimeInfo, list[TreeEntry]] | None:
    """Copy the entry's tree to ``output`` and return the runtime's summary and the listing.

    The listing is that of :class:`CachedBuild`. An entry that is not whole is removed, and
    the result is None.
    """
    if not entry.exists():
        return None
    try:
        document = json.loads((entry / _ENTRY_FILE).read_text())
    except (OSError, ValueError) as error:
        log.debug("runtime cache: %s unreadable (%s); building again", entry, error)
        _remove(entry)
        return None
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".runtime-", dir=output.parent))
    try:
        if document.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {document.get('format')!r}")
        info = RuntimeInfo(**document["info"], source=source)
        copied = _copy_tree(entry / _TREE_DIR, staging)
        if _digest(copied) != document["tree"]:
            raise ValueError("the tree does not match its stored digest")
        os.replace(staging, output)
    except (OSError, ValueError, TypeError, KeyError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        log.debug("runtime cache: %s damaged (%s); building again", entry, error)
        _remove(entry)
        return None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _touch(entry)
    return info, _listing(copied)


def _store(
    cache_dir: Path, key: str, tree: Path, info: RuntimeInfo
) -> list[TreeEntry] | None:
    """Store ``tree`` as the entry ``key`` and return its listing, or None if the entry exists."""
    target = cache_dir / key
    if target.exists():
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".entry-", dir=cache_dir))
    try:
        copied = _copy_tree(tree, staging / _TREE_DIR)
        stored = asdict(info)
        stored.pop("source")
        document = {"format": FORMAT_VERSION, "info": stored, "tree": _digest(copied)}
        (staging / _ENTRY_FILE).write_text(json.dumps(document, sort_keys=True) + "\n")
        os.chmod(staging, 0o755)  # noqa: S103  (readable like the rest of the cache)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.exists():
                raise
            log.debug("runtime cache: %s stored meanwhile by another build", target)
            shutil.rmtree(staging, ignore_errors=True)
            return _listing(copied)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.debug("runtime cache: stored %s", target)
    return _listing(copied)


def _copy_tree(source: Path, target: Path) -> list[TreeEntry]:
    """Copy the tree ``source`` to ``target`` (new or empty) and return its entries in walk order.

    Each entry is ``[type, relative path, permission bits, content digest or symlink
    target]``, as in :func:`enclavify.attest.treehash.tree_entries`. Their :func:`_digest`
    is the cache entry's stored digest, so a changed, missing or added file changes it.
    Regular files are hard-linked where the file system allows, which takes about a third of
    the time of copying the 21 MiB runtime. Nothing writes into a built runtime's files
    afterwards (the settings are new files), and a file changed through a link fails the
    digest check at the next use, so sharing them cannot hand out a changed runtime.
    """
    target.mkdir(exist_ok=True)
    os.chmod(target, stat.S_IMODE(os.lstat(source).st_mode))
    lines: list[TreeEntry] = []
    for directory, dirnames, filenames in os.walk(source):
        dirnames.sort()
        relative_dir = os.path.relpath(directory, source)
        for name in sorted(dirnames) + sorted(filenames):
            relative = name if relative_dir == "." else f"{relative_dir}/{name}"
            full = os.path.join(directory, name)
            copy = os.path.join(target, relative)
            info = os.lstat(full)
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                link = os.readlink(full)
                os.symlink(link, copy)
                lines.append(["symlink", relative, 0, link])
            elif stat.S_ISDIR(info.st_mode):
                os.mkdir(copy)
                os.chmod(copy, mode)
                lines.append(["dir", relative, mode, ""])
            elif stat.S_ISREG(info.st_mode):
                lines.append(["file", relative, mode, _copy_file(full, copy, mode)])
            else:
                raise ValueError(f"{full!r} is neither a file, a directory nor a symlink")
    return lines


def _listing(copied: list[TreeEntry]) -> list[TreeEntry]:
    """Return :func:`_copy_tree`'s entries sorted by path, as ``tree_entries`` lists them."""
    return sorted(copied, key=lambda entry: entry[1])


def _copy_file(source: str, target: str, mode: int) -> str:
    digest = hashlib.sha256()
    try:
        os.link(source, target)
    except OSError:
        pass  # another file system, or links not allowed: copy below
    else:
        with open(source, "rb") as reader:
            for block in iter(lambda: reader.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    with open(source, "rb") as reader, open(target, "xb") as writer:
        for block in iter(lambda: reader.read(1 << 20), b""):
            digest.update(block)
            writer.write(block)
    os.chmod(target, mode)
    return digest.hexdigest()


def _write_atomic(lookups: Path, calls: list[list[str]]) -> None:
    encoded = json.dumps(sorted(calls), separators=(",", ":")).encode()
    target = lookups / f"{hashlib.sha256(encoded).hexdigest()}.json"
    if target.exists():
        _touch(target)
        return
    lookups.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(target, encoded, mode=0o600, sync=False)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# -- housekeeping --------------------------------------------------------------------------


def _newest_first(directory: Path, *, suffix: str = "") -> list[Path]:
    try:
        children = [c for c in directory.iterdir() if not c.name.startswith(".")]
    except OSError:
        return []
    found = []
    for child in children:
        if suffix and not child.name.endswith(suffix):
            continue
        try:
            found.append((child.stat().st_mtime_ns, child))
        except OSError:
            continue
    return [child for _mtime, child in sorted(found, key=lambda item: item[0], reverse=True)]


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _remove(path: Path) -> None:
    """Remove a directory of the cache: renamed out of the way first, so no reader sees half."""
    try:
        doomed = Path(tempfile.mkdtemp(prefix=".removed-", dir=path.parent))
        os.rename(path, doomed / "entry")
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _prune(cache_dir: Path, lookups_root: Path) -> None:
    """Keep the most recently used entries and call lists; remove the rest."""
    entries = [p for p in _newest_first(cache_dir) if p.is_dir() and len(p.name) == 64]
    for stale in entries[MAX_ENTRIES:]:
        log.debug("runtime cache: removing the least recently used %s", stale)
        _remove(stale)
    host_keys = _newest_first(lookups_root)
    for stale in host_keys[MAX_LOOKUPS:]:
        _remove(stale)
    for host_key in host_keys[:MAX_LOOKUPS]:
        for stale in _newest_first(host_key, suffix=".json")[MAX_LOOKUPS:]:
            _unlink(str(stale))
