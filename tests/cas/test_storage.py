"""Storage: migrations, the audit chain and its tamper and truncation checks, encryption at rest."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclavify.cas import audit
from enclavify.cas.audit import AuditRecord, HeadFile
from enclavify.cas.masterkey import MasterKey, master_key_path
from enclavify.cas.paths import CA_CERT
from enclavify.cas.pki import CA_KEY, SERVER_CERT, ensure_server_pki
from enclavify.cas.storage import SCHEMA_VERSION, Database, redact_url
from enclavify.errors import CasError

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _append(database: Database, head: HeadFile, count: int) -> None:
    for i in range(count):
        with database.transaction(write=True) as tx:
            position = audit.append(
                tx, AuditRecord(action="create", client="c", session=f"s{i}", outcome="ok"),
                now=NOW,
            )
        head.advance(*position)


def _audit_cli(data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enclavify", "cas", "audit", "--data", str(data), *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    database = Database.open(str(tmp_path / "cas.db"))
    assert database.migrate() == 0
    assert database.migrate() == SCHEMA_VERSION
    with database.transaction(write=False) as tx:
        assert tx.execute("PRAGMA journal_mode")[0][0] == "wal"
        assert tx.execute("PRAGMA synchronous")[0][0] == 2  # FULL


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    database = Database.open(str(tmp_path / "cas.db"))
    database.migrate()
    with database.transaction(write=True) as tx:
        tx.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(CasError, match="newer than this CAS"):
        database.migrate()


def test_audit_chain_verifies(tmp_path: Path) -> None:
    database = Database.open(str(tmp_path / "cas.db"))
    database.migrate()
    head = HeadFile(tmp_path / audit.HEAD_FILE)
    _append(database, head, 5)
    result = audit.verify_chain(database, head)
    assert result.ok, result.problems
    assert result.records == 5
    completed = _audit_cli(tmp_path, "--verify")
    assert completed.returncode == 0, completed.stderr
    assert "5 records" in completed.stdout
    listing = _audit_cli(tmp_path)
    assert [json.loads(line)["session"] for line in listing.stdout.splitlines()] == [
        f"s{i}" for i in range(5)
    ]


def test_altered_record_detected(tmp_path: Path) -> None:
    database = Database.open(str(tmp_path / "cas.db"))
    database.migrate()
    head = HeadFile(tmp_path / audit.HEAD_FILE)
    _append(database, head, 4)
    connection = sqlite3.connect(tmp_path / "cas.db")
    row = connection.execute("SELECT record FROM audit_log WHERE seq = 2").fetchone()
    record = json.loads(row[0])
    record["outcome"] = "refused"
    connection.execute(
        "UPDATE audit_log SET record = ? WHERE seq = 2", (json.dumps(record, sort_keys=True),)
    )
    connection.commit()
    connection.close()
    result = audit.verify_chain(database, head)
    assert any("record 2 was altered" in p for p in result.problems), result.problems
    completed = _audit_cli(tmp_path, "--verify")
    assert completed.returncode == 1
    assert "record 2 was altered" in completed.stderr


def test_deleted_middle_record_detected(tmp_path: Path) -> None:
    database = Database.open(str(tmp_path / "cas.db"))
    database.migrate()
    head = HeadFile(tmp_path / audit.HEAD_FILE)
    _append(database, head, 4)
    with database.transaction(write=True) as tx:
        tx.execute("DELETE FROM audit_log WHERE seq = 2")
    result = audit.verify_chain(database, head)
    assert any("record 2 is missing" in p for p in result.problems), result.problems


def test_truncation_detected_by_head_file(tmp_path: Path) -> None:
    database = Database.open(str(tmp_path / "cas.db"))
    database.migrate()
    head = HeadFile(tmp_path / audit.HEAD_FILE)
    _append(database, head, 5)
    # Cut the last two records and move the database's own head row back consistently:
    # the chain alone now looks intact; only the head file shows the loss.
    with database.transaction(write=True) as tx:
        tx.execute("DELETE FROM audit_log WHERE seq > 3")
        digest = tx.execute("SELECT hash FROM audit_log WHERE seq = 3")[0][0]
        tx.execute("UPDATE audit_head SET seq = 3, hash = ? WHERE id = 1", (digest,))
    assert audit.verify_chain(database, None).ok
    result = audit.verify_chain(database, head)
    assert any("truncated" in p for p in result.problems), result.problems
    completed = _audit_cli(tmp_path, "--verify")
    assert completed.returncode == 1
    assert "truncated" in completed.stderr


def test_head_file_never_moves_back(tmp_path: Path) -> None:
    head = HeadFile(tmp_path / audit.HEAD_FILE)
    head.advance(5, "e" * 64)
    head.advance(3, "d" * 64)
    assert head.read() == (5, "e" * 64)


@pytest.mark.parametrize("content", ["{}", "[]", '{"seq": "5", "hash": "e"}', '{"seq": 5}'])
def test_invalid_head_file_is_cas_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / audit.HEAD_FILE
    path.write_text(content)
    with pytest.raises(CasError, match=r"audit head file .* is invalid"):
        HeadFile(path).read()


def test_master_key_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    key = MasterKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    sealed = key.seal(b"fspf key material", "session:a:b")
    assert b"fspf" not in sealed.encode()
    assert key.open(sealed, "session:a:b") == b"fspf key material"
    with pytest.raises(CasError, match="failed authentication"):
        key.open(sealed, "session:a:c")
    with pytest.raises(CasError, match="unknown format"):
        key.open("not base64!", "session:a:b")
    os.chmod(path, 0o644)
    with pytest.raises(CasError, match="accessible by others"):
        MasterKey.load_or_create(path)


def test_master_key_race_keeps_first_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second CAS process that checked for the key file just before the first one wrote it
    # must adopt that key, not replace it: records are already sealed under it.
    path = tmp_path / "master.key"
    first = MasterKey.load_or_create(path)
    sealed = first.seal(b"secret value", "secret:s:x")
    written = path.read_bytes()
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: False if self == path else real_exists(self))
    second = MasterKey.load_or_create(path)
    assert path.read_bytes() == written
    assert second.open(sealed, "secret:s:x") == b"secret value"


def test_master_key_file_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "keys" / "cas-master.key"
    monkeypatch.setenv("ENCLAVIFY_CAS_MASTER_KEY_FILE", str(elsewhere))
    assert master_key_path(tmp_path / "data") == elsewhere
    monkeypatch.delenv("ENCLAVIFY_CAS_MASTER_KEY_FILE")
    assert master_key_path(tmp_path / "data") == tmp_path / "data" / "master.key"


@pytest.mark.postgres
def test_postgres_migrates_and_chains(postgres_url: str, tmp_path: Path) -> None:
    database = Database.open(postgres_url)
    assert database.migrate() == 0
    assert database.migrate() == SCHEMA_VERSION
    head = HeadFile(tmp_path / audit.HEAD_FILE)
    _append(database, head, 3)
    result = audit.verify_chain(database, head)
    assert result.ok, result.problems
    database.close()


def _start_pki(data_dir: str) -> str:
    return ensure_server_pki(Path(data_dir))[0].fingerprint()


def test_concurrent_first_starts_share_one_ca(tmp_path: Path) -> None:
    # Processes starting together on one data directory must end up with one CA whose key
    # matches its certificate and signed the server certificate.
    data = tmp_path / "cas"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        fingerprints = pool.map(_start_pki, [str(data)] * 8)
    assert len(set(fingerprints)) == 1
    ca_cert = x509.load_pem_x509_certificate((data / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((data / CA_KEY).read_bytes(), None)
    assert ca_key.public_key() == ca_cert.public_key()
    server_cert = x509.load_pem_x509_certificate((data / SERVER_CERT).read_bytes())
    server_cert.verify_directly_issued_by(ca_cert)


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("postgresql://cas:s3cret@db.internal:5432/cas", ("db.internal",)),
        ("postgresql://cas@db.internal/cas?sslmode=require&password=s3cret", ("db.internal",)),
        ("postgres://db.internal/cas?password=s3cret", ("db.internal",)),
        ("host=db.internal dbname=cas user=cas password=s3cret", ("db.internal", "password")),
        ("host=db.internal password = 's3cret x' dbname=cas", ("db.internal", "password")),
    ],
)
def test_database_url_redacts_password(url: str, kept: tuple[str, ...]) -> None:
    redacted = redact_url(url)
    assert "s3cret" not in redacted
    assert "***" in redacted
    for word in kept:
        assert word in redacted


@pytest.mark.parametrize(
    "url",
    [
        "host=db.internal dbname=cas user=cas password=s3cret",
        "password=s3cret host=db.internal",
        " dbname = cas password = 's3cret x'",
    ],
)
def test_keyword_connection_string_rejected(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taken as a relative SQLite path, the string would create a file here.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CasError) as excinfo:
        Database.open(url)
    message = str(excinfo.value)
    assert "postgresql://" in message
    assert "s3cret" not in message
    assert list(tmp_path.iterdir()) == []
