"""JSON parsing and canonical encoding for the launcher's measuring child, without :mod:`json`.

At start the launcher forks a child that measures the image. The child hashes the runtime,
reads ``runtime.json`` and encodes the measured values as canonical JSON. Importing
:mod:`json` there took about 7 ms (measured in a container), because ``json.decoder``
imports :mod:`re` with enum and functools, and the child needs none of them. The work of
:mod:`json` is done in CPython's ``_json`` extension, which imports nothing, so this module
calls it directly. :func:`loads` matches ``json.loads`` for a ``str``. :func:`dumps` matches
``json.dumps(value, sort_keys=True, separators=(",", ":"))`` for the value types a
measurement contains. Tests compare both with :mod:`json`.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# Whitespace allowed between JSON tokens. The scanner does not skip it before a value.
_WHITESPACE = " \t\n\r"


def _no_constant(name: str) -> Any:
    # json.loads accepts NaN and Infinity, but measured settings never contain them.
    raise ValueError(f"invalid JSON value {name}: NaN and Infinity are not allowed")


class _Context:
    """Decoder settings that ``_json.make_scanner`` reads, as a ``json.JSONDecoder`` has them."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_no_constant)


try:
    from _json import encode_basestring_ascii as _quote
    from _json import make_scanner as _make_scanner
except ImportError:  # pragma: no cover - every CPython has _json
    from json import JSONDecoder as _JSONDecoder
    from json.encoder import py_encode_basestring_ascii as _quote

    _scan: Callable[[str, int], tuple[Any, int]] = _JSONDecoder(
        parse_constant=_no_constant
    ).scan_once  # type: ignore[attr-defined]
else:
    # The C scanner reads the settings above from any object, not only a JSONDecoder.
    _scan = _make_scanner(_Context())  # type: ignore[arg-type]


def loads(text: str) -> Any:
    """Parse the JSON document ``text``.

    Raises:
        ValueError: ``text`` is not exactly one JSON value, with whitespace around it.
    """
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as stop:
        raise ValueError(f"invalid JSON: expected a value at character {stop.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"invalid JSON: extra data after the value at character {end}")
    return value


def dumps(value: Any) -> str:
    """Return ``value`` as compact JSON with sorted keys and all non-ASCII escaped.

    Raises:
        TypeError: ``value`` contains something other than dicts with string keys, lists,
            tuples, strings, integers, booleans and None.
    """
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts)


def _encode(value: Any, parts: list[str]) -> None:
    if isinstance(value, str):
        parts.append(_quote(value))
    elif value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, int):
        parts.append(int.__repr__(value))
    elif isinstance(value, (list, tuple)):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _encode(item, parts)
        parts.append("]")
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"cannot encode a {type(key).__name__} key: keys must be strings")
        parts.append("{")
        for index, key in enumerate(sorted(value)):
            if index:
                parts.append(",")
            parts.append(_quote(key))
            parts.append(":")
            _encode(value[key], parts)
        parts.append("}")
    else:
        raise TypeError(f"cannot encode a {type(value).__name__} value in measurement JSON")
