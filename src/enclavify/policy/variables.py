"""Secret variables in commands, environment values and injected files.

``$$SCONE::name$$`` is the secret's default rendering, ``$$SCONE::name:format$$`` a chosen
format, and the older ``$$SCONE::name.crt$$``, ``.key``, ``.chain`` and ``.hex`` suffixes are
the same as ``:crt``, ``:privatekey``, ``:chain`` and ``:hex``. Secret names contain no dots,
so a suffix is never part of a name. Any other text starting with ``$$SCONE::`` is an error,
so a typo cannot leave a variable unexpanded in a program's configuration.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from enclavify.secrets.value import DOT_SUFFIXES

PREFIX = "$$SCONE::"
_VARIABLE = re.compile(
    r"\$\$SCONE::(?P<name>[A-Za-z0-9_-]{1,128})"
    r"(?:\.(?P<suffix>crt|key|chain|hex)|:(?P<format>[a-z0-9]{1,32}))?\$\$"
)


@dataclass(frozen=True)
class Reference:
    """One variable found in a text."""

    name: str
    format: str | None
    start: int
    end: int


class MalformedVariable(ValueError):
    """Text starting with ``$$SCONE::`` that is not a valid variable; ``offset`` is where."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"malformed $$SCONE:: variable at offset {offset}")
        self.offset = offset


def find_references(text: str) -> Iterator[Reference]:
    """Yield the variables in ``text`` in order.

    Raises:
        MalformedVariable: a ``$$SCONE::`` that does not start a valid variable.
    """
    position = 0
    while True:
        start = text.find(PREFIX, position)
        if start < 0:
            return
        match = _VARIABLE.match(text, start)
        if match is None:
            raise MalformedVariable(start)
        suffix = match.group("suffix")
        fmt = DOT_SUFFIXES[suffix] if suffix else match.group("format")
        yield Reference(match.group("name"), fmt, start, match.end())
        position = match.end()


def substitute(text: str, lookup: Callable[[Reference], str]) -> str:
    """Replace every variable in ``text`` by ``lookup(reference)``."""
    parts: list[str] = []
    position = 0
    for reference in find_references(text):
        parts.append(text[position : reference.start])
        parts.append(lookup(reference))
        position = reference.end
    parts.append(text[position:])
    return "".join(parts)
