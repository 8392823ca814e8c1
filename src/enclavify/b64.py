"""Base64 for the modules the launcher carries, without :mod:`base64`.

:mod:`base64` imports :mod:`re` (with enum and functools) to validate its input, about 5 ms
at every confidential start measured in a container. The coding itself is done by
:mod:`binascii`, which imports nothing. This module adds the strict check that
``base64.b64decode(text, validate=True)`` makes: binascii's strict mode from Python 3.11, a
regular expression before. Tests compare both with :mod:`base64`.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

import binascii

TYPE_CHECKING = False
if TYPE_CHECKING:
    _Text = str | bytes | bytearray | memoryview

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_TO_URLSAFE = str.maketrans("+/", "-_")

try:
    binascii.a2b_base64(b"", strict_mode=True)  # type: ignore[call-arg, unused-ignore]
    _HAS_STRICT_MODE = True
except TypeError:  # Python before 3.11
    _HAS_STRICT_MODE = False


def encode(data: bytes) -> str:
    """Return ``data`` in standard base64 with padding, as ``base64.b64encode`` does."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def encode_urlsafe_unpadded(data: bytes) -> str:
    """Return ``data`` in the URL-safe alphabet without ``=`` padding (base64url)."""
    return encode(data).translate(_TO_URLSAFE).rstrip("=")


def decode(text: _Text) -> bytes:
    """Decode standard base64, rejecting what ``base64.b64decode(text, validate=True)`` rejects.

    Raises:
        TypeError: ``text`` is neither a string nor bytes-like.
        ValueError: ``text`` is a ``str`` with non-ASCII characters, or contains a character
            outside the alphabet, padding anywhere but at the end, or the wrong padding
            (:class:`binascii.Error`, a ``ValueError``).
    """
    if isinstance(text, str):
        try:
            data = text.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("string argument should contain only ASCII characters") from None
    else:
        # Through memoryview, because bytes(5) would be five zero bytes, not a TypeError.
        data = memoryview(text).tobytes()
    if _HAS_STRICT_MODE:
        return binascii.a2b_base64(data, strict_mode=True)  # type: ignore[call-arg, unused-ignore]
    # What base64 checks before Python 3.11: at most two padding characters at the end, and
    # nothing outside the alphabet before them.
    digits = data.rstrip(b"=")
    if len(data) - len(digits) > 2 or digits.translate(None, _ALPHABET):
        raise binascii.Error("Non-base64 digit found")
    return binascii.a2b_base64(data)
