"""The launcher's measurement of its own image, taken at start by two processes at once.

Hashing the runtime and the binary (about 27 MB) takes about 20 ms, and the evidence needs the
measurement only after the launcher has imported its modules, connected to the CAS and
received a challenge. So the work is split: a forked child hashes the runtime tree while the
launcher imports, and the launcher hashes the binary and the fspf once it needs the
measurement, while the CAS challenge is under way. A thread would be slower than the child.
hashlib releases the GIL while it hashes a block, but the thread must take the GIL back after
each block, and the importing main thread keeps it for up to the 5 ms switch interval each
time.

The binary is usually the interpreter that the runtime carries a copy of (``bin/python3``, a
third of the runtime's bytes). The child leaves that copy out, and the launcher compares it
with the binary while it hashes the binary: when they are the same bytes, they have the same
digest. Comparing costs less than half of hashing. The digest is the one a full hash gives,
so the measurement does not change.

The entrypoint (``enclavify.runtime.__main__``) imports this module first and starts the child
right away, so that the second CPU starts hashing while the launcher imports its modules. The
child needs only :mod:`enclavify.attest.treehash`, which needs only hashlib; this module
imports the rest of the measurement code only when it measures. It imports hashlib itself,
before the fork, because both processes need it and loading it (with libcrypto) takes about
2.5 ms: once is enough.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

import hashlib  # noqa: F401 - for the child, see above
import os
import stat

from enclavify.errors import Error, LaunchError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs about 2 ms at every container start
    from collections.abc import Callable
    from os import PathLike
    from typing import IO, Any, Optional

    from enclavify.attest.treehash import TreeEntry
    from enclavify.runtime.config import RuntimeConfig

# The runtime's place in a confidential image, as in enclavify.runtime.config.
RUNTIME_DIR = "/opt/enclavify"


# The runtime's copy of the interpreter, relative to the runtime directory.
INTERPRETER = "bin/python3"

# Prefixes of the child's report on the pipe: before the runtime's entries, or an error message.
_OK = b"ok "
_ERROR = b"error "


def measure(
    config: RuntimeConfig,
    runtime_dir: str | PathLike[str] = RUNTIME_DIR,
    root: str | PathLike[str] = "/",
    runtime_entries: Optional[Callable[[], list[TreeEntry]]] = None,
) -> str:
    """Return the measurement of this image as found on disk under ``root``.

    ``runtime_entries`` returns the entries of ``runtime_dir`` when another process hashes it,
    with the digest of :data:`INTERPRETER` deferred. It is called after the binary is hashed,
    so that both are hashed at once.
    """
    from enclavify.attest import measurement  # noqa: PLC0415 - see the module's docstring
    from enclavify.runtime.config import CONFIG_NAME  # noqa: PLC0415

    files = measurement.RootFiles(root)
    compare = runtime_entries is not None
    try:
        binary_digest, interpreter_digest = _hash_binary(files, config, runtime_dir, compare)
    except OSError as error:
        raise LaunchError(f"cannot measure the binary: {error}") from error
    except Error as error:
        raise LaunchError(f"cannot measure the binary: {error.diagnostics()}") from error
    fspf_digest = measurement.fspf_digest(files.host_path(config.fspf_path))
    if runtime_entries is None:
        entries = _runtime_entries(runtime_dir)
    else:
        entries = runtime_entries()
        _fill_deferred(entries, runtime_dir, interpreter_digest)
    digest = measurement.entries_digest(entries)
    try:
        return measurement.compute(
            runtime_digest=digest,
            binary=config.binary,
            binary_digest=binary_digest,
            fspf_digest=fspf_digest,
            heap=config.heap,
            stack=config.stack,
            dlopen=config.dlopen,
        )
    except Error as error:
        raise LaunchError(f"{CONFIG_NAME}: {error.diagnostics()}") from error


def _hash_binary(
    files: Any, config: RuntimeConfig, runtime_dir: str | PathLike[str], compare: bool
) -> tuple[str, Optional[str]]:
    """Return the binary's digest, and the interpreter copy's digest if it is the same bytes.

    With ``compare`` false, or when there is no copy to compare, the second value is None.
    Raises OSError or UsageError when the binary cannot be read.
    """
    from enclavify.attest import measurement, treehash  # noqa: PLC0415 - see the module's docstring

    binary = measurement.resolve_binary(files, config.binary, config.regions)
    if binary is None:
        return measurement.PROTECTED_BINARY, None
    with files.open(binary) as stream:
        copy = _open_interpreter(runtime_dir) if compare else None
        if copy is None:
            return treehash.sha256_stream(stream), None
        with copy:
            digest, identical = treehash.sha256_and_compare(stream, copy)
    return digest, digest if identical else None


def _fill_deferred(
    entries: list[TreeEntry], runtime_dir: str | PathLike[str], interpreter_digest: Optional[str]
) -> None:
    """Put the interpreter copy's digest into its deferred entry, hashing the copy if need be."""
    from enclavify.attest import treehash  # noqa: PLC0415 - see the module's docstring

    for entry in entries:
        if entry[1] != INTERPRETER or entry[3] != treehash.DEFERRED:
            continue
        if interpreter_digest is not None:
            entry[3] = interpreter_digest
            continue
        try:
            entry[3] = treehash.entry_of(runtime_dir, INTERPRETER)[3]
        except OSError as error:
            raise LaunchError(f"cannot measure the runtime: {error}") from error


class PendingMeasurement:
    """The image's measurement, whose runtime digest a forked child process is computing.

    Start it while the process has no other thread. :meth:`result` hashes the rest, waits for
    the child, reaps it and returns the measurement, or raises LaunchError with the reason.
    """

    def __init__(
        self, runtime_dir: str | PathLike[str] = RUNTIME_DIR, root: str | PathLike[str] = "/"
    ) -> None:
        self._runtime_dir = runtime_dir
        self._root = root
        self._value: Optional[str] = None
        self._error: Optional[str] = None
        # What the child reports: the runtime's entries, or why it has none.
        self._runtime_entries: Optional[list[TreeEntry]] = None
        self._child_error = ""
        reading, writing = os.pipe()
        try:
            self._child = os.fork()
        except BaseException:
            os.close(reading)
            os.close(writing)
            raise
        if self._child == 0:  # pragma: no cover - runs in the child, which ends with os._exit
            os.close(reading)
            _hash_runtime_in_child(writing, runtime_dir)
        os.close(writing)
        self._reading = reading

    def result(self, config: Optional[RuntimeConfig] = None) -> str:
        """Return the measurement, computing it on the first call.

        ``config`` is the runtime's settings if the caller loaded them already.

        Raises:
            LaunchError: the measurement failed; the message gives the reason.
        """
        if self._value is None and self._error is None:
            try:
                if config is None:
                    from enclavify.runtime.config import CONFIG_NAME, RuntimeConfig  # noqa: PLC0415

                    config = RuntimeConfig.load(os.path.join(self._runtime_dir, CONFIG_NAME))
                self._value = measure(config, self._runtime_dir, self._root, self._entries)
            except LaunchError as error:
                self._error = str(error)
            except OSError as error:  # the fspf exists but cannot be read, for example
                self._error = f"cannot measure the image: {error}"
            finally:
                self.close()
        if self._error is not None:
            raise LaunchError(self._error)
        assert self._value is not None
        return self._value

    def close(self) -> None:
        """Wait for the child and reap it, whether or not the result is wanted."""
        if self._reading >= 0:
            self._collect()

    def _entries(self) -> list[TreeEntry]:
        """Return the child's runtime entries, waiting for them if need be."""
        self.close()
        if self._runtime_entries is None:
            raise LaunchError(self._child_error)
        return self._runtime_entries

    def _collect(self) -> None:
        report = b""
        try:
            while True:
                data = os.read(self._reading, 4096)
                if not data:
                    break
                report += data
        finally:
            os.close(self._reading)
            self._reading = -1
            _, status = os.waitpid(self._child, 0)
        if report.startswith(_OK):
            from enclavify import jsontext  # noqa: PLC0415 - see the module's docstring

            self._runtime_entries = jsontext.loads(report[len(_OK) :].decode("ascii"))
        elif report.startswith(_ERROR):
            self._child_error = report[len(_ERROR) :].decode("utf-8", errors="replace")
        else:
            self._child_error = f"hashing the runtime failed in a child process (status {status})"


def _hash_runtime_in_child(  # pragma: no cover
    writing: int, runtime_dir: str | PathLike[str]
) -> None:
    """Hash the runtime tree, write its entries to ``writing`` and end the child; never returns.

    The digest of :data:`INTERPRETER` is left to the parent.
    """
    status = 0
    try:
        try:
            entries = _runtime_entries(runtime_dir, deferred=INTERPRETER)
            from enclavify import jsontext  # noqa: PLC0415 - see the module's docstring

            report = _OK + jsontext.dumps(entries).encode("ascii")
        except Error as error:
            report = _ERROR + error.diagnostics().encode("utf-8", errors="replace")
        except Exception as error:  # any failure must reach the parent as a message
            report = _ERROR + f"cannot measure the runtime: {error}".encode(errors="replace")
        view = memoryview(report)
        while view:
            view = view[os.write(writing, view) :]
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _open_interpreter(runtime_dir: str | PathLike[str]) -> Optional[IO[bytes]]:
    """Open the runtime's copy of the interpreter if it is a regular file, else return None."""
    path = os.path.join(runtime_dir, INTERPRETER)
    try:
        # Neither a symlink followed nor a FIFO waited for: the child lists those as they are.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        return None
    return os.fdopen(descriptor, "rb", buffering=0)


def _runtime_entries(
    runtime_dir: str | PathLike[str], deferred: Optional[str] = None
) -> list[TreeEntry]:
    """Hash the runtime tree, but not ``deferred``; raise LaunchError when it cannot be read."""
    from enclavify.attest.treehash import tree_entries  # noqa: PLC0415

    try:
        return tree_entries(runtime_dir, deferred)
    except OSError as error:
        raise LaunchError(f"cannot measure the runtime: {error}") from error
