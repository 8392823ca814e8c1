"""JSON for the launcher's measuring child, without importing :mod:`json`.

The launcher forks a child at start that measures the image: it hashes the runtime, then
reads ``runtime.json`` and encodes the measured values as canonical JSON. Importing
:mod:`json` there costs about 7 ms of that child's time, because ``json.decoder`` imports
:mod:`re` (with enum and functools), which nothing else in the child needs. The parts of
:mod:`json` that do the work are in CPython's ``_json`` extension, which imports nothing,
so this module calls them directly: :func:`loads` is ``json.loads`` for a ``str`` and
:func:`dumps` is ``json.dumps`` with ``separators=(",", ":")`` and ``sort_keys=True``, for
the values a measurement holds. Tests check both against :mod:`json`.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# The whitespace JSON allows between tokens, which the scanner does not skip before a value.
_WHITESPACE = " \t\n\r"


def _no_constant(name: str) -> Any:
    # json.loads accepts NaN and Infinity; measured settings never contain them.
    raise ValueError(f"{name} is not allowed here")


class _Context:
    """The settings ``_json.make_scanner`` reads from a ``json.JSONDecoder``."""

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
    """Parse the JSON document ``text``; raise ValueError when it is not one."""
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as stop:
        raise ValueError(f"expected a JSON value at character {stop.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"extra data after the JSON value at character {end}")
    return value


def dumps(value: Any) -> str:
    """Return ``value`` as compact JSON with sorted keys, all non-ASCII escaped.

    ``value`` is made of dicts with string keys, lists, tuples, strings, integers, booleans
    and None; anything else raises TypeError.
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
        parts.append("{")
        for index, key in enumerate(sorted(value)):
            if not isinstance(key, str):
                raise TypeError(f"keys must be strings, not {type(key).__name__}")
            if index:
                parts.append(",")
            parts.append(_quote(key))
            parts.append(":")
            _encode(value[key], parts)
        parts.append("}")
    else:
        raise TypeError(f"{type(value).__name__} values are not encoded here")
