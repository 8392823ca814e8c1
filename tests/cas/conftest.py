"""Fixtures that run real CAS processes over TLS on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from enclavify.cas import tls
from enclavify.cas.client import Identity
from enclavify.cas.identity import identity_key_hash, load_or_create_identity
from tests.cas_process import CasProcess, start_cas

MEASUREMENT = "11" * 32
OTHER_MEASUREMENT = "44" * 32


@pytest.fixture(params=["direct", "ssl"])
def each_tls_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the client's connections on ``_ssl`` directly, then with the ssl module."""
    direct = request.param == "direct"
    if direct and not tls.DIRECT:
        pytest.skip("this Python's _ssl lacks the calls that enclavify.cas.tls makes directly")
    monkeypatch.setattr(tls, "DIRECT", direct)


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[CasProcess]:
    with start_cas(tmp_path / "cas") as server:
        yield server


@pytest.fixture(scope="module")
def shared_cas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasProcess]:
    with start_cas(tmp_path_factory.mktemp("shared") / "cas") as server:
        yield server


@pytest.fixture(scope="session")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    directory = tmp_path_factory.mktemp("identities")
    return {name: load_or_create_identity(directory / f"{name}.pem") for name in ("alice", "bob")}


def key_hash(identity: Identity) -> str:
    return identity_key_hash(identity)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    base = os.environ.get("ENCLAVIFY_TEST_POSTGRES")
    if not base:
        pytest.skip("ENCLAVIFY_TEST_POSTGRES is not set (source scripts/services to start one)")
    name = f"enclavify_cas_{secrets.token_hex(6)}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    prefix, _, _ = base.rpartition("/")
    yield f"{prefix}/{name}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def namespace_yaml(name: str, *, create_sessions: str = "[CREATOR]", read: str = "[CREATOR]",
                   update: str = "[CREATOR]") -> str:
    return (
        f"name: {name}\nversion: '0.3'\naccess_policy:\n  read: {read}\n  update: {update}\n"
        f"  create_sessions: {create_sessions}\n"
    )


def app_yaml(name: str, *, mode: str = "simulation", measurement: str = MEASUREMENT,
             extra_secrets: str = "", read: str = "[CREATOR]", update: str = "[CREATOR]",
             environment: str = "") -> str:
    return f"""\
name: {name}
version: "0.3"
access_policy:
  read: {read}
  update: {update}
services:
  - name: api
    mrenclaves: ["{measurement}"]
    command: python3 /app/api.py --password $$SCONE::password$$
    environment:
      TOKEN: $$SCONE::token:hex$${environment}
    pwd: /app
    fspf_path: /.enclavify/fspf
    fspf_key: "{"22" * 32}"
    fspf_tag: "{"33" * 16}"
secrets:
  - name: password
    kind: ascii
    size: 24
  - name: token
    kind: binary
    size: 16
  - name: ca
    kind: x509-ca
    common_name: test ca
    export_public: true
{extra_secrets}security:
  attestation:
    mode: {mode}
"""
