"""Access control over real TLS: the creator, another client and a caller without a certificate
against every endpoint, asserting that nothing unauthorised is read or written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from enclavify.cas.client import CasClient, Identity
from enclavify.cas.pki import ensure_server_pki
from enclavify.errors import CasError, CasRejected

from .conftest import CasProcess, key_hash, namespace_yaml, unique


def _rejected(call: object, status: int | None = None) -> CasRejected:
    with pytest.raises(CasRejected) as caught:
        call()  # type: ignore[operator]
    if status is not None:
        assert caught.value.status == status, str(caught.value)
    return caught.value


def test_access_matrix(shared_cas: CasProcess, identities: dict[str, Identity]) -> None:
    alice = shared_cas.client(identities["alice"])
    bob = shared_cas.client(identities["bob"])
    anonymous = shared_cas.client(None)
    name = unique("matrix")
    text = namespace_yaml(name)
    digest = alice.create_session(text)

    # Reading: only the creator.
    assert alice.get_session(name)["hash"] == digest
    assert len(alice.session_history(name)) == 1
    _rejected(lambda: bob.get_session(name), 404)
    _rejected(lambda: bob.session_history(name), 404)
    assert "certificate" in str(_rejected(lambda: anonymous.get_session(name), 403))
    _rejected(lambda: anonymous.session_history(name), 403)

    # Public values need no certificate (this session exports none).
    assert anonymous.public_values(name) == {}
    assert bob.public_values(name) == {}

    # Updating: only the creator, and only with the current predecessor.
    update = text.replace("version: '0.3'", "version: '0.4'") + f"predecessor: {digest}\n"
    _rejected(lambda: bob.update_session(update), 403)
    _rejected(lambda: anonymous.update_session(update), 403)
    assert alice.get_session(name)["hash"] == digest, "a refused update changed the session"

    # Creating below the namespace: only who create_sessions names.
    child = namespace_yaml(f"{name}/child")
    _rejected(lambda: bob.create_session(child), 403)
    _rejected(lambda: anonymous.create_session(child), 403)
    _rejected(lambda: alice.get_session(f"{name}/child"), 404)

    # Re-creating an existing session is a conflict, whoever tries it.
    _rejected(lambda: bob.create_session(text), 409)
    _rejected(lambda: alice.create_session(text), 409)

    new_digest = alice.update_session(update)
    assert new_digest != digest
    alice.create_session(child)
    assert [r["hash"] for r in alice.session_history(name)] == [digest, new_digest]


def test_access_lists_name_keys(shared_cas: CasProcess, identities: dict[str, Identity]) -> None:
    alice = shared_cas.client(identities["alice"])
    bob = shared_cas.client(identities["bob"])
    bob_hash = key_hash(identities["bob"])
    name = unique("shared")
    alice.create_session(namespace_yaml(
        name, read=f"[CREATOR, {bob_hash}]", create_sessions="[ANY]", update="[NONE]"
    ))
    assert bob.get_session(name)["name"] == name
    bob.create_session(namespace_yaml(f"{name}/bobs"))
    # The child's CREATOR is bob, not the namespace's creator.
    _rejected(lambda: alice.get_session(f"{name}/bobs"), 404)
    assert bob.get_session(f"{name}/bobs")["creator"] == bob_hash
    current = alice.get_session(name)["hash"]
    update = namespace_yaml(name) + f"predecessor: {current}\n"
    _rejected(lambda: alice.update_session(update), 403)


def test_missing_namespace_refused(shared_cas: CasProcess, identities: dict[str, Identity]) -> None:
    alice = shared_cas.client(identities["alice"])
    error = _rejected(lambda: alice.create_session(namespace_yaml(unique("none") + "/x")), 404)
    assert "namespace" in str(error)


def test_unknown_session_is_not_found(
    shared_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    alice = shared_cas.client(identities["alice"])
    _rejected(lambda: alice.get_session("no-such-session"), 404)
    _rejected(lambda: alice.public_values("no-such-session"), 404)


def test_stale_predecessor_conflicts(
    shared_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    alice = shared_cas.client(identities["alice"])
    name = unique("stale")
    text = namespace_yaml(name)
    digest = alice.create_session(text)
    _rejected(lambda: alice.update_session(text + f"predecessor: {'ab' * 32}\n"), 409)
    assert alice.get_session(name)["hash"] == digest


def test_client_pins_the_cas(shared_cas: CasProcess, tmp_path: Path) -> None:
    other, _ = ensure_server_pki(tmp_path / "other")
    wrong = CasClient(shared_cas.address, ca_pem=other.ca_pem(), attempts=1)
    with pytest.raises(CasError, match="certificate verification"):
        wrong.public_values("x")
    with pytest.raises(CasError, match="fingerprint mismatch"):
        CasClient(shared_cas.address, ca_pem=shared_cas.ca_pem, fingerprint=other.fingerprint())
    pinned_wrong = CasClient(shared_cas.address, fingerprint=other.fingerprint())
    with pytest.raises(CasError, match="fingerprint mismatch"):
        pinned_wrong.public_values("x")


def test_refusals_are_audited(shared_cas: CasProcess, identities: dict[str, Identity]) -> None:
    alice = shared_cas.client(identities["alice"])
    bob = shared_cas.client(identities["bob"])
    name = unique("audited")
    text = namespace_yaml(name)
    digest = alice.create_session(text)
    _rejected(lambda: bob.update_session(text + f"predecessor: {digest}\n"), 403)
    listing = subprocess.run(
        [sys.executable, "-m", "enclavify", "cas", "audit", "--data", str(shared_cas.data)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    records = [json.loads(line) for line in listing.splitlines()]
    mine = [r for r in records if r["session"] == name]
    assert [(r["action"], r["outcome"]) for r in mine] == [("create", "ok"), ("update", "refused")]
    assert mine[0]["client"] == key_hash(identities["alice"])
    assert mine[0]["hash_after"] == digest
    assert mine[1]["client"] == key_hash(identities["bob"])
    assert "may not update" in mine[1]["reason"]
    verified = subprocess.run(
        [sys.executable, "-m", "enclavify", "cas", "audit", "--data", str(shared_cas.data),
         "--verify"], capture_output=True, text=True, timeout=60, check=False,
    )
    assert verified.returncode == 0, verified.stderr
