"""Build the runtime carried into a confidential image (``/opt/enclavify``).

The launcher must start while every protected directory is encrypted and absent from the
image, the interpreter's own standard library included, so it carries everything it needs:

    bin/python3                  a copy of the image's Python interpreter
    lib/<loader>                 the ELF loader named by the interpreter's PT_INTERP
    lib/<soname>                 every shared library the interpreter and the carried
                                 extension modules need (DT_NEEDED closure)
    lib/python3X.zip             an empty zip that stops Python's search for its prefix
    lib/python3.X/               the standard library modules the launcher imports
    lib/python3.X/lib-dynload/   the extension modules among them that are not built in
    lib/python3.X/enclavify/     the carried enclavify modules, as source

The interpreter is started as ``lib/<loader> --library-path /opt/enclavify/lib bin/python3``.
The loader hands the program ``/opt/enclavify/bin/python3`` as ``argv[0]``, and Python looks
for its prefix from there. It walks up from ``bin/`` until it finds ``lib/python3.X/os.py``
(and ``lib-dynload`` for the exec prefix), so the standard library subset keeps the layout of
a normal installation. ``-I -S`` keeps environment variables, the user site
directory and ``site`` out of it, so nothing outside ``/opt/enclavify`` is read before the
launcher has decrypted the protected regions.

The interpreter is never run on the host: the image may be for another libc or
architecture. Its version is read from file names and the ELF, and the module list is
computed by importing the launcher on the host's own Python, then closed over the image's
standard library by reading its module-level imports.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from enclavify import __version__
from enclavify.attest.measurement import RootFiles
from enclavify.errors import ImageError

if TYPE_CHECKING:
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

log = logging.getLogger(__name__)

RUNTIME_ROOT = "/opt/enclavify"
LIBRARY_DIR = f"{RUNTIME_ROOT}/lib"
INTERPRETER = f"{RUNTIME_ROOT}/bin/python3"
DEFAULT_INTERPRETERS = ("/usr/local/bin/python3", "/usr/bin/python3")
# The directory that contains the enclavify package whose modules the runtime carries.
SOURCE_ROOT = Path(__file__).resolve().parent.parent.parent

# The enclavify modules the launcher may import. Some are imported only on one path (the
# ctypes crypto backend when pyca/cryptography is absent, a TEE evidence producer), so all
# are imported explicitly when the module list is computed.
CARRIED_MODULES = (
    "enclavify.runtime.launcher",
    "enclavify.runtime.config",
    "enclavify.runtime.measuring",
    "enclavify.runtime.libcrypto",
    "enclavify.errors",
    "enclavify.logs",
    "enclavify.crypto",
    "enclavify.protect.format",
    "enclavify.protect.unseal",
    "enclavify.attest.measurement",
    "enclavify.attest.treehash",
    "enclavify.attest.report_data",
    "enclavify.attest.producers",
    "enclavify.attest.configfs_tsm",
    "enclavify.cas.client",
)
# Standard library modules carried although the launcher does not import them:
# enclavify.cas.tls makes its connections with them on a Python whose _ssl lacks the calls it
# otherwise makes directly. Carrying them keeps that fallback working in any image.
FALLBACK_MODULES = ("ssl", "socket")
# The launcher's entry script, below the carried standard library.
LAUNCHER_SCRIPT = "enclavify/runtime/__main__.py"
# Runtime package files copied even though importing them has side effects.
CARRIED_FILES = (LAUNCHER_SCRIPT,)

# Standard library modules that importing the launcher does not show. The interpreter and the
# socket and ssl modules look codecs up by name at run time. On Pythons that build the hash
# functions as extension modules, hashlib imports them at start-up. Names vary between
# versions, and those an interpreter lacks are skipped.
EXTRA_STDLIB = (
    "runpy",
    "_md5",
    "_sha1",
    "_sha2",
    "_sha256",
    "_sha512",
    "_sha3",
    "_blake2",
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.utf_8_sig",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.idna",
    "encodings.punycode",
    "encodings.raw_unicode_escape",
    "encodings.unicode_escape",
    "stringprep",
)
# Optional imports of shutil and similar modules that the launcher never uses: leaving them
# out saves their extension modules and libbz2 and liblzma.
EXCLUDED_STDLIB = frozenset({"bz2", "_bz2", "lzma", "_lzma", "_compression"})
# Extension modules without which the launcher cannot work; the others have pure Python
# fallbacks or exist only in some Python versions.
REQUIRED_EXTENSIONS = ("_socket", "_ssl", "select", "_ctypes", "_struct", "binascii", "math")
# Loaded with dlopen by glibc: the NSS modules (before 2.34) to resolve host names, and
# libgcc_s when a thread exits or is cancelled. Each is carried when the image has it.
EXTRA_LIBRARIES = ("libnss_files.so.2", "libnss_dns.so.2", "libresolv.so.2", "libgcc_s.so.1")

_MACHINES = {
    "EM_X86_64": ("x86_64", "x86_64-linux-gnu"),
    "EM_AARCH64": ("aarch64", "aarch64-linux-gnu"),
    "EM_386": ("i386", "i386-linux-gnu"),
    "EM_ARM": ("arm", "arm-linux-gnueabihf"),
    "EM_PPC64": ("ppc64le", "powerpc64le-linux-gnu"),
    "EM_S390": ("s390x", "s390x-linux-gnu"),
    "EM_RISCV": ("riscv64", "riscv64-linux-gnu"),
}
_VERSION_NAME = re.compile(r"python(3\.\d+)")
_FULL_VERSION = re.compile(rb"(?<![0-9.])(3\.\d{1,2}\.\d{1,2})(?:(?:a|b|rc)\d+)?\+?\x00")


class ImageFiles(Protocol):
    """The read-only file access the builder needs; an image's merged file system has it."""

    def entry(self, path: str) -> Any: ...
    def resolve(self, path: str) -> str | None: ...
    def open(self, path: str) -> IO[bytes]: ...
    def walk(self, top: str) -> Iterator[Any]: ...
    def listdir(self, path: str) -> list[str]: ...


class DirectoryFiles(RootFiles):
    """A host directory seen as an image root, with the merged file system's methods."""

    def walk(self, top: str) -> Iterator[Any]:
        """Yield the entries under ``top`` (itself included), directories before contents."""
        first = self.entry(top)
        if first is None:
            return
        yield first
        if first.type != "dir":
            return
        for name in self.listdir(top):
            yield from self.walk(posixpath.join(first.path, name))

    def listdir(self, path: str) -> list[str]:
        """Return the sorted names in the directory ``path`` (a final symlink is followed)."""
        resolved = self.resolve(path)
        if resolved is None:
            raise FileNotFoundError(path)
        return sorted(os.listdir(self.host_path(resolved)))


@dataclass(frozen=True)
class RuntimeInfo:
    """Summary of a runtime built by :func:`build_runtime`, recorded in the conversion result."""

    size: int
    files: int
    python_version: str
    interpreter: str
    interpreter_sha256: str
    source: str
    libc: str
    arch: str
    loader: str
    stdlib: str
    entrypoint: list[str] = field(default_factory=list)
    runtime_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Elf:
    path: str
    machine: str
    elfclass: int
    interp: str | None
    needed: list[str]
    search: list[str]
    symbols: set[str]


def build_runtime(
    files: ImageFiles, output: Path, *, python: str | None = None, source: str
) -> RuntimeInfo:
    """Build the carried runtime from the image ``files`` into the new directory ``output``.

    ``python`` is the interpreter's path in the image (default: the first of
    ``/usr/local/bin/python3`` and ``/usr/bin/python3`` that exists); ``source`` names where
    the image came from (the image itself or a ``--base`` image) and is recorded. ``output``
    must not exist; it is written under a temporary name and renamed when complete.
    Raises ImageError when the image has no usable Python.
    """
    if output.exists():
        raise ImageError(f"runtime output directory {str(output)!r} already exists")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".runtime-", dir=output.parent))
    try:
        os.chmod(staging, 0o755)  # noqa: S103  (an ordinary directory in the image)
        info = _Builder(files, staging, python=python, source=source).build()
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


class _Builder:
    def __init__(self, files: ImageFiles, out: Path, *, python: str | None, source: str) -> None:
        self.files = files
        self.out = out
        self.python = python
        self.source = source
        self.copied_libs: dict[str, str] = {}

    def build(self) -> RuntimeInfo:
        interpreter_path = self._find_interpreter()
        interpreter = self._read_elf(interpreter_path)
        arch, triplet = _MACHINES.get(interpreter.machine, (interpreter.machine, ""))
        if interpreter.interp is None:
            raise ImageError(
                f"{interpreter_path!r} in the image is statically linked or not an "
                "executable; pass --base IMAGE with a dynamically linked Python"
            )
        libc = "musl" if "musl" in interpreter.interp else "glibc"
        version = self._python_version(interpreter_path, interpreter)
        stdlib_dir, libdir_name = self._find_stdlib(interpreter_path, version)
        log.debug(
            "runtime: interpreter %s (Python %s, %s, %s), stdlib %s",
            interpreter_path,
            version,
            libc,
            arch,
            stdlib_dir,
        )

        (self.out / "bin").mkdir()
        (self.out / "lib").mkdir()
        if libdir_name != "lib":
            # Python looks for its standard library under its platform libdir name.
            os.symlink("lib", self.out / libdir_name)
        self._copy_file(interpreter_path, self.out / "bin" / "python3", 0o755)
        interpreter_sha256 = _sha256_file(self.out / "bin" / "python3")

        search_dirs = self._library_dirs(libc, arch, triplet)
        loader_name = posixpath.basename(interpreter.interp)
        self._copy_library_file(interpreter.interp, loader_name)

        # Built-in modules export their PyInit_ function from the interpreter or libpython.
        builtin_symbols = set(interpreter.symbols)
        for name in interpreter.needed:
            if name.startswith("libpython"):
                located = self._locate(name, interpreter.search, search_dirs, interpreter)
                if located is not None:
                    builtin_symbols |= self._read_elf(located).symbols

        stdlib_out = self.out / "lib" / f"python{version}"
        stdlib_out.mkdir()
        # Python 3.11 and newer look for lib/python3X.zip in every parent directory of bin/
        # before they look for os.py, so a zip in the image's unmeasured /opt/lib would
        # become the standard library. An empty zip here ends that search inside the runtime.
        zipfile.ZipFile(self.out / "lib" / f"python{version.replace('.', '')}.zip", "w").close()
        modules = _launcher_modules()
        compiler = _Compiler(stdlib_out, version)
        try:
            extensions = self._copy_stdlib(stdlib_dir, stdlib_out, modules["stdlib"], compiler)
            dynload_objects = self._copy_extensions(
                stdlib_dir, stdlib_out, extensions, builtin_symbols
            )
            self._copy_enclavify(stdlib_out, modules["enclavify"])

            pending = [interpreter, *dynload_objects]
            for name in EXTRA_LIBRARIES:
                located = self._locate(name, [], search_dirs, interpreter)
                if located is not None:
                    pending.append(self._read_elf(located))
                    self._copy_library_file(located, name)
            self._library_closure(pending, search_dirs)
            compiler.finish()
        except BaseException:
            compiler.abort()
            raise

        size, count = _tree_size(self.out)
        loader = f"{LIBRARY_DIR}/{loader_name}"
        return RuntimeInfo(
            size=size,
            files=count,
            python_version=_full_version(self.files, interpreter_path, interpreter, version),
            interpreter=interpreter_path,
            interpreter_sha256=interpreter_sha256,
            source=self.source,
            libc=libc,
            arch=arch,
            loader=loader,
            stdlib=f"{LIBRARY_DIR}/python{version}",
            # The launcher's __main__.py by path rather than -m enclavify.runtime: -m imports
            # runpy and importlib.util first, about 2 ms at every start. -I keeps the
            # script's directory off sys.path, so imports still resolve in the runtime.
            entrypoint=[
                loader,
                "--library-path",
                LIBRARY_DIR,
                INTERPRETER,
                "-I",
                "-S",
                "-B",
                f"{LIBRARY_DIR}/python{version}/{LAUNCHER_SCRIPT}",
                "run",
            ],
        )

    # -- the interpreter -------------------------------------------------------------

    def _find_interpreter(self) -> str:
        candidates = [self.python] if self.python else list(DEFAULT_INTERPRETERS)
        for candidate in candidates:
            resolved = self.files.resolve(candidate)
            if resolved is None:
                continue
            entry = self.files.entry(resolved)
            if entry is not None and entry.type in ("file", "hardlink"):
                return resolved
        tried = ", ".join(repr(c) for c in candidates)
        raise ImageError(
            f"no Python interpreter found in the image (looked for {tried}); the launcher "
            "needs one: pass --base IMAGE naming an image with Python 3.8 or newer for the "
            "same platform"
        )

    def _read_elf(self, path: str) -> _Elf:
        # pyelftools is imported here: a conversion that takes the runtime from the cache
        # reads no ELF file and so skips the import.
        from elftools.common.exceptions import ELFError  # noqa: PLC0415
        from elftools.elf.dynamic import DynamicSection  # noqa: PLC0415
        from elftools.elf.elffile import ELFFile  # noqa: PLC0415
        from elftools.elf.sections import SymbolTableSection  # noqa: PLC0415

        with self.files.open(path) as stream:
            data = stream.read()
        try:
            elf = ELFFile(io.BytesIO(data))
            interp = None
            for segment in elf.iter_segments():
                if segment["p_type"] == "PT_INTERP":
                    interp = segment.get_interp_name()  # type: ignore[attr-defined]
            needed: list[str] = []
            search: list[str] = []
            runpath: list[str] = []
            rpath: list[str] = []
            dynsym: SymbolTableSection | None = None
            for section in elf.iter_sections():
                if isinstance(section, SymbolTableSection) and section.name == ".dynsym":
                    dynsym = dynsym or section
                elif isinstance(section, DynamicSection):
                    for tag in section.iter_tags():
                        if tag.entry.d_tag == "DT_NEEDED":
                            needed.append(tag.needed)  # type: ignore[attr-defined]
                        elif tag.entry.d_tag == "DT_RUNPATH":
                            runpath.extend(tag.runpath.split(":"))  # type: ignore[attr-defined]
                        elif tag.entry.d_tag == "DT_RPATH":
                            rpath.extend(tag.rpath.split(":"))  # type: ignore[attr-defined]
            origin = posixpath.dirname(path)
            for directory in runpath or rpath:
                if directory:
                    search.append(directory.replace("$ORIGIN", origin).replace("${ORIGIN}", origin))
            symbols = set() if dynsym is None else _init_symbols(elf, dynsym, data)
            return _Elf(path, elf["e_machine"], elf.elfclass, interp, needed, search, symbols)
        except ELFError as error:
            raise ImageError(
                f"{path!r} in the image is not a valid ELF file ({error}); pass --base IMAGE "
                "or name the interpreter binary itself"
            ) from error

    def _python_version(self, path: str, elf: _Elf) -> str:
        match = _VERSION_NAME.search(posixpath.basename(path))
        if match:
            return match.group(1)
        for name in elf.needed:
            match = re.match(r"libpython(3\.\d+)", name)
            if match:
                return match.group(1)
        prefix = posixpath.dirname(posixpath.dirname(path))
        found = set()
        for libdir in ("lib", "lib64"):
            directory = posixpath.join(prefix, libdir)
            if self.files.entry(directory) is None:
                continue
            for name in self.files.listdir(directory):
                match = re.fullmatch(r"python(3\.\d+)", name)
                if match and self.files.entry(f"{directory}/{name}/os.py") is not None:
                    found.add(match.group(1))
        if len(found) == 1:
            return found.pop()
        raise ImageError(
            f"cannot tell the Python version of {path!r} in the image; pass --base IMAGE"
        )

    def _find_stdlib(self, path: str, version: str) -> tuple[str, str]:
        prefixes = [posixpath.dirname(posixpath.dirname(path)), "/usr/local", "/usr"]
        for prefix in dict.fromkeys(prefixes):
            for libdir in ("lib", "lib64"):
                directory = posixpath.join(prefix, libdir, f"python{version}")
                if self.files.entry(f"{directory}/os.py") is not None:
                    return directory, libdir
        raise ImageError(
            f"the standard library of Python {version} (os.py) is not in the image; "
            "pass --base IMAGE"
        )

    # -- Python modules --------------------------------------------------------------

    def _copy_stdlib(
        self, stdlib: str, out: Path, names: Iterable[str], compiler: _Compiler
    ) -> list[str]:
        """Copy the pure Python modules and their import closure; return extension names."""
        queue = sorted(set(names) | set(EXTRA_STDLIB))
        seen: set[str] = set()
        extensions: set[str] = set()
        while queue:
            name = queue.pop()
            if name in seen or name.split(".")[0] in EXCLUDED_STDLIB:
                continue
            seen.add(name)
            for parent in _parents(name):
                if parent not in seen:
                    queue.append(parent)
            relative = self._stdlib_source(stdlib, name)
            if relative is None:
                if "." not in name:
                    extensions.add(name)
                continue
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self._copy_file(f"{stdlib}/{relative}", target, 0o644)
            compiler.add(target)
            package = name if relative.endswith("__init__.py") else name.rpartition(".")[0]
            for imported in _module_imports(target.read_bytes(), package):
                if imported not in seen:
                    queue.append(imported)
        return sorted(extensions)

    def _stdlib_source(self, stdlib: str, name: str) -> str | None:
        base = name.replace(".", "/")
        for relative in (f"{base}.py", f"{base}/__init__.py"):
            entry = self.files.entry(f"{stdlib}/{relative}")
            if entry is not None and entry.type in ("file", "hardlink", "symlink"):
                return relative
        return None

    def _copy_extensions(
        self, stdlib: str, out: Path, names: list[str], builtin_symbols: set[str]
    ) -> list[_Elf]:
        dynload = f"{stdlib}/lib-dynload"
        available = self.files.listdir(dynload) if self.files.entry(dynload) else []
        (out / "lib-dynload").mkdir(parents=True, exist_ok=True)
        objects = []
        for name in names:
            matches = [f for f in available if f.startswith(name + ".") and f.endswith(".so")]
            if matches:
                filename = sorted(matches)[0]
                self._copy_file(f"{dynload}/{filename}", out / "lib-dynload" / filename, 0o755)
                objects.append(self._read_elf(f"{dynload}/{filename}"))
                continue
            if f"PyInit_{name}" in builtin_symbols:
                continue
            if name in REQUIRED_EXTENSIONS:
                raise ImageError(
                    f"the image's Python has no {name!r} module, which the launcher needs; "
                    "pass --base IMAGE with a complete Python"
                )
            log.debug("runtime: module %s is not in the image's Python; skipped", name)
        return objects

    def _copy_enclavify(self, out: Path, names: Iterable[str]) -> None:
        package_root = SOURCE_ROOT
        relatives = set(CARRIED_FILES)
        for name in names:
            base = name.replace(".", "/")
            if (package_root / base / "__init__.py").is_file():
                relatives.add(f"{base}/__init__.py")
            else:
                relatives.add(f"{base}.py")
        for relative in sorted(relatives):
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package_root / relative, target)
            os.chmod(target, 0o644)

    # -- shared libraries ------------------------------------------------------------

    def _library_dirs(self, libc: str, arch: str, triplet: str) -> list[str]:
        dirs: list[str] = []
        if libc == "musl":
            path_file = f"/etc/ld-musl-{arch}.path"
            if self.files.entry(path_file) is not None:
                with self.files.open(path_file) as stream:
                    text = stream.read().decode(errors="replace")
                dirs.extend(d for d in re.split(r"[:\n]", text) if d.strip())
            dirs.extend(["/lib", "/usr/local/lib", "/usr/lib"])
        else:
            dirs.extend(self._ld_so_conf("/etc/ld.so.conf", depth=0))
            if triplet:
                dirs.extend([f"/lib/{triplet}", f"/usr/lib/{triplet}"])
            dirs.extend(["/lib64", "/usr/lib64", "/lib", "/usr/lib"])
        return list(dict.fromkeys(d.strip() for d in dirs))

    def _ld_so_conf(self, path: str, depth: int) -> list[str]:
        if depth > 8 or self.files.resolve(path) is None:
            return []
        with self.files.open(path) as stream:
            lines = stream.read().decode(errors="replace").splitlines()
        dirs: list[str] = []
        for raw in lines:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("include"):
                pattern = line.split(None, 1)[1] if " " in line or "\t" in line else ""
                if not pattern.startswith("/"):
                    pattern = posixpath.join(posixpath.dirname(path), pattern)
                directory, glob = posixpath.split(pattern)
                if self.files.resolve(directory) is None:
                    continue
                for name in self.files.listdir(directory):
                    if fnmatch.fnmatch(name, glob):
                        dirs.extend(self._ld_so_conf(f"{directory}/{name}", depth + 1))
            else:
                dirs.append(line)
        return dirs

    def _locate(self, name: str, own: list[str], dirs: list[str], like: _Elf) -> str | None:
        if "/" in name:
            return self.files.resolve(name)
        for directory in [*own, *dirs]:
            resolved = self.files.resolve(posixpath.join(directory, name))
            if resolved is None:
                continue
            entry = self.files.entry(resolved)
            if entry is None or entry.type not in ("file", "hardlink"):
                continue
            try:
                candidate = self._read_elf(resolved)
            except ImageError:
                continue
            if candidate.machine == like.machine and candidate.elfclass == like.elfclass:
                return resolved
        return None

    def _library_closure(self, pending: list[_Elf], dirs: list[str]) -> None:
        done: set[str] = set()
        while pending:
            current = pending.pop()
            if current.path in done:
                continue
            done.add(current.path)
            for name in current.needed:
                if name in self.copied_libs:
                    continue
                located = self._locate(name, current.search, dirs, current)
                if located is None:
                    raise ImageError(
                        f"shared library {name!r} needed by {current.path!r} not found in the image"
                    )
                self._copy_library_file(located, name)
                pending.append(self._read_elf(located))

    def _copy_library_file(self, path: str, name: str) -> None:
        resolved = self.files.resolve(path)
        if resolved is None:
            raise ImageError(f"{path!r} not found in the image")
        target = self.out / "lib" / posixpath.basename(name)
        if not target.exists():
            self._copy_file(resolved, target, 0o755)
        self.copied_libs[name] = resolved

    def _copy_file(self, path: str, target: Path, mode: int) -> None:
        with self.files.open(path) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
        os.chmod(target, mode)


_COMPILE_SERVER = r"""
import compileall, sys
from py_compile import PycInvalidationMode
ok = True
for line in sys.stdin:
    path, _, ddir = line.rstrip("\n").partition("\t")
    ok = bool(compileall.compile_file(
        path, ddir=ddir, quiet=1, invalidation_mode=PycInvalidationMode.UNCHECKED_HASH
    )) and ok
sys.exit(0 if ok else 1)
"""


class _Compiler:
    """Compiles the carried modules to bytecode in a second process, as they are copied.

    The launcher runs with -B, which stops Python from writing bytecode, not from reading it.
    Without .pyc files every start compiles the launcher's modules again (measured: 0.3 s of a
    0.9 s start). Unchecked-hash .pyc files do not depend on file times. A fresh process with a
    fixed hash seed writes the same bytes every time, so two builds keep the same digest.

    The process takes each module's path as soon as it is copied, so compiling runs on a
    second core while this process parses the next modules for their imports. Compiling all
    of them at the end made a build wait about 0.55 s on a 2-core machine. Bytecode is only
    written when this Python writes the carried one's format; otherwise the modules go without.
    """

    def __init__(self, stdlib_out: Path, version: str) -> None:
        self._root = stdlib_out
        self._sent: set[Path] = set()
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        if version != f"{sys.version_info.major}.{sys.version_info.minor}":
            log.debug("runtime: Python %s carried, %s here: no bytecode", version, sys.version)
            return
        self._ddir = f"{LIBRARY_DIR}/python{version}"
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 (closed in finish or abort)
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-c", _COMPILE_SERVER],
            stdin=subprocess.PIPE,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            env={"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "")},
        )

    def add(self, path: Path) -> None:
        """Queue the module at ``path`` (below the carried standard library) for compiling."""
        if self._process is None or self._process.stdin is None or path in self._sent:
            return
        relative = path.parent.relative_to(self._root).as_posix()
        ddir = self._ddir if relative == "." else f"{self._ddir}/{relative}"
        line = f"{path}\t{ddir}"
        if "\n" in line or line.count("\t") != 1:
            return  # a name the line protocol cannot carry goes without bytecode
        self._sent.add(path)
        with contextlib.suppress(BrokenPipeError):  # the exit status tells in finish()
            self._process.stdin.write(line.encode("utf-8", "surrogateescape") + b"\n")
            self._process.stdin.flush()

    def finish(self) -> None:
        """Queue the modules not queued yet, and wait until all are compiled."""
        if self._process is None or self._process.stdin is None:
            return
        for root, dirs, files in os.walk(self._root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    self.add(Path(root) / name)
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        try:
            returncode = self._process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            returncode = -1
        if returncode != 0 and self._output is not None:
            # The sources are still there; a module without bytecode only starts slower.
            self._output.seek(0)
            tail = self._output.read()[-500:].decode(errors="replace")
            log.debug("runtime: compiling the modules failed: %s", tail)
        if self._output is not None:
            self._output.close()

    def abort(self) -> None:
        """Stop the compiling process after a failed build."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._output is not None:
            self._output.close()


def _init_symbols(elf: ELFFile, dynsym: SymbolTableSection, data: bytes) -> set[str]:
    """Return the ``PyInit_*`` names in the dynamic symbol table ``dynsym`` of ``elf``.

    A built-in extension module's init function is exported, so the dynamic table alone
    finds it. Only the name offsets are read here, straight from the section bytes: decoding
    every symbol with pyelftools took seconds for libpython's thousands of symbols.
    """
    entry_size = dynsym["sh_entsize"]
    start, size = dynsym["sh_offset"], dynsym["sh_size"]
    if dynsym["sh_type"] == "SHT_NOBITS" or entry_size < 4 or start + size > len(data):
        return set()
    strings_section = elf.get_section(dynsym["sh_link"])
    strings_start = strings_section["sh_offset"]
    strings = data[strings_start : strings_start + strings_section["sh_size"]]
    # st_name, the offset of the symbol's name in the linked string table, is the first
    # word of an entry in both the 32-bit and the 64-bit layout.
    word = "<I" if elf.little_endian else ">I"
    table = data[start : start + size - size % entry_size]
    symbols: set[str] = set()
    for (offset,) in struct.iter_unpack(f"{word}{entry_size - 4}x", table):
        if strings.startswith(b"PyInit_", offset):
            end = strings.find(b"\0", offset)
            name = strings[offset:] if end < 0 else strings[offset:end]
            symbols.add(name.decode("utf-8", errors="replace"))
    return symbols


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _module_imports(source: bytes, package: str) -> set[str]:
    """Return the modules a module imports at module level (not inside functions)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        # Source for a newer Python than the host's: fall back to reading import lines,
        # which also finds imports inside functions and so copies a little more.
        return _scan_imports(source, package)
    found: set[str] = set()
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base:
                found.add(base)
                # ``from package import name`` may name a submodule; the caller skips
                # names that are not modules.
                found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        stack.extend(ast.iter_child_nodes(node))
    return found


_IMPORT_LINE = re.compile(
    rb"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+\(?([\w ,\t]+)|import[ \t]+([\w., \t]+))",
    re.MULTILINE,
)


def _scan_imports(source: bytes, package: str) -> set[str]:
    found: set[str] = set()
    for match in _IMPORT_LINE.finditer(source):
        base, names, plain = (group.decode() if group else "" for group in match.groups())
        if plain:
            for item in plain.split(","):
                words = item.split()
                if words:
                    found.add(words[0])
            continue
        level = len(base) - len(base.lstrip("."))
        base = base.lstrip(".")
        if level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        if base:
            found.add(base)
            for item in names.split(","):
                words = item.split()
                if words:
                    found.add(f"{base}.{words[0]}")
    return found


_COLLECT = r"""
import importlib, json, os, sys
sys.modules["cryptography"] = None  # take the path of an image without pyca/cryptography
sys.path.insert(0, sys.argv[1])
import runpy
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        print("missing " + name, file=sys.stderr)
stdlib = os.path.dirname(os.__file__)
src = os.path.join(sys.argv[1], "enclavify")
result = {"stdlib": [], "enclavify": [], "other": []}
for name, module in sorted(sys.modules.items()):
    if module is None or name == "__main__":
        continue
    origin = getattr(module, "__file__", None)
    if name in sys.builtin_module_names or origin is None:
        result["stdlib"].append(name)
    elif origin.startswith(src + os.sep):
        result["enclavify"].append(name)
    elif origin.startswith(stdlib + os.sep) and "site-packages" not in origin:
        result["stdlib"].append(name)
    else:
        result["other"].append(name)
print(json.dumps(result))
"""


def _launcher_modules() -> dict[str, list[str]]:
    """Import the carried modules on the host's Python and list what they pulled in."""
    src = str(SOURCE_ROOT)
    process = subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", _COLLECT, src, *CARRIED_MODULES,
         *FALLBACK_MODULES],
        capture_output=True,
        text=True,
        check=False,
    )
    if process.returncode != 0:
        raise ImageError(
            "importing the launcher's modules failed, so the runtime cannot be built: "
            + process.stderr.strip().splitlines()[-1]
            if process.stderr.strip()
            else "importing the launcher's modules failed"
        )
    for line in process.stderr.splitlines():
        log.debug("runtime: carried module %s", line)
    result: dict[str, list[str]] = json.loads(process.stdout)
    if result["other"]:
        raise ImageError(
            "the launcher imports modules outside the standard library: "
            + ", ".join(result["other"])
        )
    return result


def _full_version(files: ImageFiles, path: str, elf: _Elf, version: str) -> str:
    """Return the full version (``3.11.2``) found in the interpreter or libpython, else ``3.X``."""
    candidates = [path]
    for name in elf.needed:
        if name.startswith("libpython"):
            for directory in ("/usr/local/lib", "/usr/lib", "/lib"):
                resolved = files.resolve(f"{directory}/{name}")
                if resolved:
                    candidates.append(resolved)
    for candidate in candidates:
        with files.open(candidate) as stream:
            data = stream.read()
        for match in _FULL_VERSION.finditer(data):
            found = match.group(1).decode()
            if found.startswith(version + "."):
                return found
    return version


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_size(root: Path) -> tuple[int, int]:
    size = 0
    count = 0
    for directory, _dirs, names in os.walk(root):
        for name in names:
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(info.st_mode):
                size += info.st_size
                count += 1
    return size, count
