"""Loggers for the modules the launcher carries: the standard library's, or stderr alone.

Importing :mod:`logging` costs about 5 ms at every confidential start, mostly for the
traceback and tokenize modules it pulls in, which the launcher never needs. So the carried
modules take their logger from :func:`get_logger`. Outside a confidential image (the
converter, the CAS, the tests) each call is handed to ``logging.getLogger(name)``, so
handlers, levels and pytest's ``caplog`` work as usual. The launcher calls :func:`to_stderr`
first. From then on a record at or above the level goes straight to stderr as
``LEVEL name: message``, the format the launcher's logging handler used before.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # for annotations only: the launcher must not import logging
    import logging

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40
_LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}

# The lowest level written to stderr, or None while records go to the logging module.
_stderr_level: list[int | None] = [None]


def to_stderr(level_name: str) -> None:
    """Write records at ``level_name`` (``debug`` … ``error``) and above to stderr from now on.

    An unknown name means ``warning``, so that a typo never hides a security warning.
    """
    levels = {name.lower(): level for level, name in _LEVEL_NAMES.items()}
    _stderr_level[0] = levels.get(level_name.lower(), WARNING)


def get_logger(name: str) -> Logger:
    """Return the logger of the module ``name``."""
    return Logger(name)


class Logger:
    """The few methods of :class:`logging.Logger` that the carried modules use."""

    __slots__ = ("_standard", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._standard: logging.Logger | None = None

    def debug(self, message: str, *args: object) -> None:
        self._log(DEBUG, message, args)

    def warning(self, message: str, *args: object) -> None:
        self._log(WARNING, message, args)

    def _log(self, level: int, message: str, args: tuple[object, ...]) -> None:
        threshold = _stderr_level[0]
        if threshold is None:
            standard = self._standard
            if standard is None:
                import logging  # noqa: PLC0415 - imported only outside the launcher

                standard = self._standard = logging.getLogger(self.name)
            # stacklevel 3 names the carried module's caller, not this method, in the record.
            standard.log(level, message, *args, stacklevel=3)
            return
        if level < threshold:
            return
        try:
            text = message % args if args else message
        except (TypeError, ValueError):
            text = f"{message} {args!r}"
        sys.stderr.write(f"{_LEVEL_NAMES[level]} {self.name}: {text}\n")
        sys.stderr.flush()
