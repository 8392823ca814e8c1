"""Arbitrary input must give a Session or a PolicyError, never another exception."""

from __future__ import annotations

import contextlib
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclavify.errors import PolicyError
from enclavify.policy import parse_session, session_from_dict, session_hash, session_to_dict

from .conftest import VALID_SESSION

KEYS = [
    "name",
    "version",
    "services",
    "images",
    "secrets",
    "command",
    "environment",
    "kind",
    "path",
    "content",
    "mode",
    "security",
    "attestation",
    "tolerate",
    "mrenclave",
    "issuer",
    "private_key",
    "dns",
    "san",
    "value",
    "size",
    "import",
    "export",
    "access_policy",
    "read",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["$$SCONE::x$$", "$$SCONE::", "/a/../b", "ab" * 32, "ascii", "x509", "P-256"]),
)
documents = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


def _accepts_or_policy_error(document: Any) -> None:
    try:
        session = session_from_dict(document)
    except PolicyError:
        return
    assert session_from_dict(session_to_dict(session)) == session
    session_hash(session)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_documents(document: Any) -> None:
    _accepts_or_policy_error(document)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_session(data: st.DataObject) -> None:
    document = yaml.safe_load(VALID_SESSION)
    # Replace one value somewhere in the valid session by an arbitrary one.
    node: Any = document
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        node[key] = data.draw(documents)
        break
    _accepts_or_policy_error(document)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    with contextlib.suppress(PolicyError):
        parse_session(text)
