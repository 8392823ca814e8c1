"""jsontext, the JSON subset of the measuring child, gives the json module's results."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclavify import jsontext

# Values of the kinds a measurement and runtime.json contain, so no floats.
values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@given(values)
def test_dumps_is_canonical_json(value: Any) -> None:
    assert jsontext.dumps(value) == json.dumps(value, sort_keys=True, separators=(",", ":"))


@given(values, st.sampled_from([None, 2]))
def test_loads_reads_what_json_writes(value: Any, indent: int | None) -> None:
    text = json.dumps(value, indent=indent) + "\n"
    assert jsontext.loads(text) == json.loads(text)
    assert jsontext.loads(text) == value


def test_loads_floats_and_whitespace() -> None:
    assert jsontext.loads(' \t{"heap": 1.5e3, "a": [true, false, null]}\r\n') == {
        "heap": 1500.0,
        "a": [True, False, None],
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a value at character 0"),
        ("[1,", "expected a value at character 3|Expecting value"),
        ("{} {}", "extra data after the value at character 2"),
        ('{"a": NaN}', "invalid JSON value NaN"),
        ("[-Infinity]", "invalid JSON value -Infinity"),
        ('"tab\there"', "Invalid control character"),
        ("{'a': 1}", "Expecting property name"),
    ],
)
def test_loads_rejects_invalid_documents(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        jsontext.loads(text)


@pytest.mark.parametrize("value", [1.5, {1: "a"}, b"bytes", {"a": {2, 3}}])
def test_dumps_rejects_unsupported_types(value: Any) -> None:
    with pytest.raises(TypeError):
        jsontext.dumps(value)
