"""Errors that enclavify raises on purpose.

Every one derives from :class:`Error`, whose :meth:`Error.diagnostics` is the text shown to
a user. The command line turns an :class:`Error` into that text on stderr and exit code 1, and
a :class:`UsageError` into exit code 2. Anything else escaping is a bug.

    Error
    ├── UsageError            bad flags or arguments
    ├── ImageError            unreadable, unsupported or broken image
    │   └── HostileEntryError a layer entry that would escape or abuse the root
    ├── ProtectError          protected file system failures
    │   └── IntegrityError    a sealed object or the fspf failed verification
    ├── PolicyError           invalid session, template or hook (carries the YAML path)
    ├── SecretError           a secret cannot be generated or rendered
    ├── AttestationError      evidence rejected (carries the reason)
    ├── CasError              talking to the CAS failed
    │   └── CasRejected       the CAS answered with a refusal (carries status and reason)
    └── LaunchError           the launcher cannot start the application

This module is carried into confidential images, so it uses only the standard library.
"""

from __future__ import annotations


class Error(Exception):
    """Root of the errors enclavify raises on purpose."""

    def diagnostics(self) -> str:
        """Return the message shown to a user."""
        return str(self)


class UsageError(Error):
    """Invalid command-line usage: a missing, malformed or conflicting argument."""


class ImageError(Error):
    """An image cannot be read, written or understood."""


class HostileEntryError(ImageError):
    """A layer entry that would escape the root, follow an escaping link or create a device."""


class ProtectError(Error):
    """The protected file system cannot be sealed or unsealed."""


class IntegrityError(ProtectError):
    """A sealed file or the fspf failed verification.

    The message names the file (its path, when the fspf could be opened) and never names the
    byte or the cause, so it cannot serve as an oracle.
    """


class PolicyError(Error):
    """A session, template or hook is invalid.

    ``path`` is the location of the fault in the YAML document, such as
    ``services[0].environment.HOME``, or an empty string for the document itself.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path

    def diagnostics(self) -> str:
        if self.path:
            return f"{self.path}: {self}"
        return str(self)


class SecretError(Error):
    """A secret cannot be generated, imported or rendered."""


class AttestationError(Error):
    """Evidence was rejected. The message is the reason and is safe to show to the caller."""


class CasError(Error):
    """Talking to the CAS failed (unreachable, bad certificate, unexpected response)."""


class CasRejected(CasError):
    """The CAS rejected the request. ``status`` is the HTTP status and the message its reason."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class LaunchError(Error):
    """The launcher cannot start the application inside a confidential image."""
