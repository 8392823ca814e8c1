"""Evidence from Linux configfs-tsm (``/sys/kernel/config/tsm/report``).

The kernel's TSM report interface (Linux 6.7 and later) is one interface for TDX, SEV-SNP and
other guests: create a report directory, write 64 bytes of report data to ``inblob``, read the
evidence from ``outblob`` and, for SEV-SNP, the certificate table from ``auxblob``. The
``generation`` file counts writes to the directory; if another writer changed ``inblob`` between
our write and our read, the generation moves by more than one and the read is retried.

This module is carried into confidential images: standard library and Python 3.8 syntax only.
"""

from __future__ import annotations

import os

from enclavify import logs
from enclavify.values import Value

log = logs.get_logger(__name__)

REPORT_DIRECTORY = "/sys/kernel/config/tsm/report"
ATTEMPTS = 5


class TsmError(Exception):
    """configfs-tsm is unusable or kept changing under us."""


class TsmReport(Value):
    """What one configfs-tsm report directory returned."""

    __slots__ = ("auxblob", "generation", "outblob", "provider")

    def __init__(
        self, provider: str, outblob: bytes, auxblob: bytes | None, generation: int
    ) -> None:
        self.provider = provider
        self.outblob = outblob
        self.auxblob = auxblob
        self.generation = generation


class ConfigfsFiles:
    """The file operations the reader performs, so tests can stand in for the kernel."""

    def make_entry(self, base: str) -> str:
        # configfs makes the report directory's files when the directory is created.
        entry = os.path.join(base, f"enclavify-{os.urandom(8).hex()}")
        os.mkdir(entry, 0o700)
        return entry

    def remove_entry(self, entry: str) -> None:
        os.rmdir(entry)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read(self, path: str) -> bytes:
        with open(path, "rb") as stream:
            return stream.read()

    def write(self, path: str, data: bytes) -> None:
        with open(path, "wb") as stream:
            stream.write(data)


def read_report(
    report_data: bytes,
    *,
    root: str = "/",
    attempts: int = ATTEMPTS,
    files: ConfigfsFiles | None = None,
) -> TsmReport:
    """Produce a report over ``report_data`` through configfs-tsm under ``root``.

    Raises:
        TsmError: configfs-tsm is missing, rejects the request, or a concurrent writer changed
            the report entry on every attempt.
    """
    files = files or ConfigfsFiles()
    base = os.path.join(root, REPORT_DIRECTORY.lstrip("/"))
    if not os.path.isdir(base):
        raise TsmError(f"configfs-tsm is not available at {base}")
    try:
        entry = files.make_entry(base)
    except OSError as error:
        raise TsmError(f"cannot create a configfs-tsm report entry in {base}: {error}") from error
    try:
        for attempt in range(1, attempts + 1):
            report = _read_once(files, entry, report_data)
            if report is not None:
                return report
            log.debug("configfs-tsm entry %s changed during attempt %d, retrying", entry, attempt)
        raise TsmError(
            f"configfs-tsm entry {entry} was changed by another writer on all {attempts} attempts"
        )
    finally:
        try:
            files.remove_entry(entry)
        except OSError as error:
            # An entry left behind is harmless: it holds no secret, only this report.
            log.debug("cannot remove configfs-tsm entry %s: %s", entry, error)


def _read_once(files: ConfigfsFiles, entry: str, report_data: bytes) -> TsmReport | None:
    before = _read_generation(files, entry)
    _write(files, os.path.join(entry, "inblob"), report_data)
    outblob = _read(files, os.path.join(entry, "outblob"))
    auxblob_path = os.path.join(entry, "auxblob")
    auxblob = _read(files, auxblob_path) if files.exists(auxblob_path) else None
    provider = _read(files, os.path.join(entry, "provider")).decode("ascii", "replace").strip()
    after = _read_generation(files, entry)
    # Our own write bumps the generation by exactly one; more means someone else wrote too.
    if after != before + 1:
        return None
    return TsmReport(provider=provider, outblob=outblob, auxblob=auxblob or None, generation=after)


def _read_generation(files: ConfigfsFiles, entry: str) -> int:
    text = _read(files, os.path.join(entry, "generation")).decode("ascii", "replace").strip()
    try:
        return int(text)
    except ValueError as error:
        raise TsmError(f"configfs-tsm generation {text!r} in {entry} is not a number") from error


def _read(files: ConfigfsFiles, path: str) -> bytes:
    try:
        return files.read(path)
    except OSError as error:
        raise TsmError(f"cannot read {path}: {error}") from error


def _write(files: ConfigfsFiles, path: str, data: bytes) -> None:
    try:
        files.write(path, data)
    except OSError as error:
        raise TsmError(f"cannot write {path}: {error}") from error
