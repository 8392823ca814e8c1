"""A base for the small value types of the modules the launcher imports.

Those modules do not use dataclasses: the launcher imports them at every container start, and
importing dataclasses (with inspect, ast and dis) and setting up each class costs several ms
there. A subclass names its fields in ``__slots__`` and sets them in its ``__init__``; this
base compares, hashes and shows them.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs about 2 ms at every container start
    from typing import Any


class Value:
    """Equality, hash and repr over the fields named in ``__slots__``.

    Fields named in ``HIDDEN`` (keys, file contents) are left out of the repr, so that logging
    a value, or a traceback that shows one, does not print them (tests/test_values.py).
    """

    __slots__: tuple[str, ...] = ()
    HIDDEN: tuple[str, ...] = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Value)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        # Lists become tuples, so that a value holding a list (group ids, say) still hashes.
        return hash(tuple(tuple(field) if isinstance(field, list) else field
                          for field in self._fields()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__
                          if name not in self.HIDDEN)
        return f"{type(self).__name__}({fields})"
