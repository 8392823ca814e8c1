"""The value base of the modules the launcher imports: equality, hash and a key-free repr."""

from __future__ import annotations

from enclavify.values import Value


class Secretive(Value):
    __slots__ = ("groups", "key", "name")
    HIDDEN = ("key",)

    def __init__(self, name: str, key: bytes, groups: list[int]) -> None:
        self.name = name
        self.key = key
        self.groups = groups


class Other(Value):
    __slots__ = ("groups", "key", "name")

    def __init__(self, name: str, key: bytes, groups: list[int]) -> None:
        self.name = name
        self.key = key
        self.groups = groups


def test_values_compare_by_type_and_fields() -> None:
    value = Secretive("a", b"k", [1, 2])

    assert value == Secretive("a", b"k", [1, 2])
    assert value != Secretive("a", b"k", [2, 1])
    assert value != Other("a", b"k", [1, 2])


def test_values_with_lists_hash() -> None:
    assert hash(Secretive("a", b"k", [1])) == hash(Secretive("a", b"k", [1]))
    assert len({Secretive("a", b"k", [1]), Secretive("a", b"k", [1])}) == 1


def test_hidden_fields_stay_out_of_repr() -> None:
    text = repr(Secretive("a", b"secret-key-bytes", [1]))

    assert text == "Secretive(groups=[1], name='a')"
    assert "secret" not in text
