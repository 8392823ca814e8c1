"""b64, the launcher's base64 without the base64 module, gives that module's results."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclavify import b64


@given(st.binary(max_size=200))
def test_encodings_match_base64(data: bytes) -> None:
    assert b64.encode(data) == base64.b64encode(data).decode("ascii")
    assert b64.encode_urlsafe_unpadded(data) == (
        base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
    )
    assert b64.decode(b64.encode(data)) == data


# Text made mostly of base64 digits and padding, so that valid and subtly invalid inputs both
# come up often.
texts = st.text(
    alphabet=st.sampled_from("ABCDabcd0129+/=-_ \n\té"), max_size=24
)


def assert_decodes_as(text: str | bytes, reference: Callable[[], bytes]) -> None:
    """Check that b64.decode(text) returns what ``reference()`` returns, or fails as it does."""
    try:
        expected = reference()
    except ValueError:
        with pytest.raises(ValueError):
            b64.decode(text)
        return
    assert b64.decode(text) == expected


@given(st.one_of(texts, texts.map(lambda text: text.encode("utf-8"))))
def test_decode_accepts_and_rejects_what_base64_validate_does(text: str | bytes) -> None:
    assert_decodes_as(text, lambda: base64.b64decode(text, validate=True))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("QUJD\n", binascii.Error),
        ("QUI===", binascii.Error),
        ("QU=I", binascii.Error),
        ("QUJ", binascii.Error),
        ("QUJDé", ValueError),
    ],
)
def test_decode_rejects_malformed_text(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        b64.decode(text)


@pytest.fixture
def without_strict_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(b64, "_HAS_STRICT_MODE", False)


@pytest.mark.usefixtures("without_strict_mode")
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts)
def test_decode_matches_pre_3_11_check(text: str) -> None:
    # Before 3.11 b64decode(validate=True) matched this expression, then decoded leniently.
    data = text.encode("utf-8")

    def before_3_11() -> bytes:
        if not re.fullmatch(b"[A-Za-z0-9+/]*={0,2}", data):
            raise binascii.Error("Non-base64 digit found")
        return binascii.a2b_base64(data)

    assert_decodes_as(data, before_3_11)


@pytest.mark.parametrize("value", [5, None, ["QUJD"]])
def test_decode_rejects_what_is_not_text(value: object) -> None:
    with pytest.raises(TypeError):
        b64.decode(value)  # type: ignore[arg-type]
