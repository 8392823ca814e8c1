from __future__ import annotations

import time

import pytest

from enclavify.errors import PolicyError
from enclavify.policy import Limits, load_yaml, loader, parse_session


@pytest.fixture(autouse=True, params=["libyaml", "pure-python"])
def event_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test with libyaml's parser (when PyYAML has it) and with PyYAML's own."""
    if request.param == "libyaml" and loader._CParser is None:
        pytest.skip("PyYAML was built without libyaml")
    if request.param == "pure-python":
        monkeypatch.setattr(loader, "_CParser", None)
    return str(request.param)


def _billion_laughs(levels: int = 9, width: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


def _refused_quickly(text: str | bytes, words: str) -> None:
    started = time.perf_counter()
    with pytest.raises(PolicyError) as info:
        parse_session(text)
    elapsed = time.perf_counter() - started
    assert words in str(info.value).lower()
    # About 0.2 s here for the deepest case; the bound leaves room for a loaded CI machine.
    assert elapsed < 1.0, f"took {elapsed:.3f} s"


def test_alias_bomb_is_refused_fast() -> None:
    _refused_quickly(_billion_laughs(), "alias")


def test_expansion_with_few_aliases_is_refused() -> None:
    # 6 aliases per level, 8 levels: under the alias limit but 6**8 nodes when expanded.
    text = _billion_laughs(levels=8, width=6)
    with pytest.raises(PolicyError) as info:
        load_yaml(text, limits=Limits(max_aliases=1000))
    assert "expands to more than" in str(info.value)


def test_deep_nesting_is_refused_fast() -> None:
    # libyaml stops at its own limit of 1000 levels while reading ahead, before the composer's
    # limit of 64 applies; either way the document is rejected.
    _refused_quickly("[" * 200_000 + "]" * 200_000, "nesting")


def test_deep_nesting_through_aliases_is_refused() -> None:
    inner = "[" * 40 + "x" + "]" * 40
    outer = "[" * 30 + "*a" + "]" * 30
    text = f"a: &a {inner}\nb: {outer}\n"
    with pytest.raises(PolicyError) as info:
        load_yaml(text)
    assert "nesting deeper" in str(info.value)


def test_oversize_is_refused_before_parsing() -> None:
    _refused_quickly(b"name: x\n" + b"#" * (1024 * 1024), "more than the limit")


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(PolicyError) as info:
        load_yaml("a: &a [1, *a]")
    assert "recursive alias" in str(info.value)


def test_python_tags_are_refused() -> None:
    for text in [
        "x: !!python/object/apply:os.system ['true']",
        "x: !!binary aGVsbG8=",
        "x: !custom 1",
        "x: !!set {a}",
    ]:
        with pytest.raises(PolicyError) as info:
            load_yaml(text)
        assert "unsupported tag" in str(info.value)


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(PolicyError) as info:
        load_yaml("a: 1\nb: 2\na: 3\n")
    assert "duplicate key 'a'" in str(info.value)
    assert "line 3" in str(info.value)


def test_complex_keys_are_refused() -> None:
    with pytest.raises(PolicyError) as info:
        load_yaml("? [a, b]\n: 1\n")
    assert "keys must be scalars" in str(info.value)


def test_timestamps_stay_strings() -> None:
    assert load_yaml("d: 2024-01-01") == {"d": "2024-01-01"}


def test_small_alias_use_is_allowed() -> None:
    assert load_yaml("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}


def test_invalid_yaml_names_the_line() -> None:
    with pytest.raises(PolicyError) as info:
        load_yaml("a: [1, 2\nb: 3\n")
    assert "line" in str(info.value)


def test_several_documents_are_refused() -> None:
    with pytest.raises(PolicyError):
        load_yaml("a: 1\n---\nb: 2\n")


def test_empty_and_non_utf8_are_refused() -> None:
    with pytest.raises(PolicyError) as info:
        load_yaml("")
    assert "empty" in str(info.value)
    with pytest.raises(PolicyError) as info:
        load_yaml(b"name: \xff\xfe")
    assert "UTF-8" in str(info.value)
