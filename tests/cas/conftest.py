"""Fixtures that run real CAS processes over TLS on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from enclavify.cas.client import CasClient, Identity
from enclavify.cas.identity import identity_key_hash, load_or_create_identity

MEASUREMENT = "11" * 32
OTHER_MEASUREMENT = "44" * 32


@dataclass
class CasProcess:
    """One ``enclavify cas serve`` subprocess and what it printed."""

    data: Path
    process: subprocess.Popen[str]
    address: str
    db: str | None
    log_lines: list[str] = field(default_factory=list)

    @property
    def ca_pem(self) -> bytes:
        return (self.data / "ca.pem").read_bytes()

    def client(self, identity: Identity | None = None, **options: object) -> CasClient:
        return CasClient(self.address, ca_pem=self.ca_pem, identity=identity, **options)  # type: ignore[arg-type]

    def log(self) -> str:
        return "".join(self.log_lines)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_cas(
    data: Path, *, db: str | None = None, extra_env: dict[str, str] | None = None,
    listen: str = "127.0.0.1:0", extra_args: tuple[str, ...] = (),
) -> CasProcess:
    command = [sys.executable, "-m", "enclavify", "-v", "cas", "serve", "--data", str(data),
               "--listen", listen]
    if db:
        command += ["--db", db]
    command += list(extra_args)
    env = dict(os.environ)
    env.update(extra_env or {})
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    assert process.stderr is not None
    lines: list[str] = []
    address = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening on https://(\S+)", line)
        if match:
            address = match.group(1)
            break
    if address is None:
        process.kill()
        raise RuntimeError("CAS did not start:\n" + "".join(lines) + process.stderr.read())
    cas = CasProcess(data, process, address, db, lines)

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return cas


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[CasProcess]:
    server = start_cas(tmp_path / "cas")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_cas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasProcess]:
    server = start_cas(tmp_path_factory.mktemp("shared") / "cas")
    yield server
    server.stop()


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
