"""Self-authenticating challenge nonces: issued without a database write, used once only.

Most tests run real CAS processes over TLS; the ones that move the clock drive a
:class:`CasService` in this process with an injected clock over a real SQLite database.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from enclavify import crypto
from enclavify.cas import audit
from enclavify.cas.audit import AuditRecord, HeadFile
from enclavify.cas.client import Identity
from enclavify.cas.masterkey import MasterKey
from enclavify.cas.service import (
    NONCE_BYTES,
    NONCE_CLOCK_MARGIN,
    NONCE_PURGE_INTERVAL,
    CasService,
)
from enclavify.cas.storage import MIGRATIONS, SCHEMA_VERSION, Database, SqliteDatabase, Transaction
from enclavify.errors import CasRejected

from .conftest import CasProcess, app_yaml, start_cas, unique
from .test_release import _request_body

ALICE = "a1" * 32
LIFETIME = 60.0
RACERS = 8


# -- a service in this process, with its clock in the test's hands ---------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


class CountingDatabase(SqliteDatabase):
    """SQLite that counts the transactions opened on it, by kind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.opened = {"read": 0, "write": 0}

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[Transaction]:
        self.opened["write" if write else "read"] += 1
        with super().transaction(write=write) as tx:
            yield tx


@dataclass
class Local:
    service: CasService
    database: CountingDatabase
    clock: Clock
    config_id: str

    def attest(self, nonce: bytes) -> dict[str, Any]:
        _, public = crypto.x25519_generate()
        return self.service.attest(_request_body(self.config_id, nonce, public), None)

    def refusal(self, nonce: bytes) -> str:
        with pytest.raises(CasRejected) as caught:
            self.attest(nonce)
        assert caught.value.status == 403
        return str(caught.value)

    def used_nonces(self) -> set[str]:
        with self.database.transaction(write=False) as tx:
            return {str(row[0]) for row in tx.execute("SELECT nonce FROM used_nonces")}

    def last_audit(self) -> dict[str, Any]:
        return list(audit.iter_records(self.database))[-1][1]


def _local(directory: Path, master_key: MasterKey | None = None) -> Local:
    database = CountingDatabase(directory / "cas.db")
    database.migrate()
    clock = Clock()
    service = CasService(
        database, master_key or MasterKey(os.urandom(32)), HeadFile(directory / audit.HEAD_FILE),
        clock=clock, nonce_lifetime=LIFETIME,
    )
    name = unique("chal")
    service.submit_session(app_yaml(name).encode(), ALICE)
    return Local(service, database, clock, f"{name}/api")


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    setup = _local(tmp_path)
    yield setup
    setup.database.close()


def _nonce(answer: dict[str, Any]) -> bytes:
    return bytes.fromhex(answer["nonce"])


def test_challenge_opens_no_transaction(local: Local) -> None:
    before = dict(local.database.opened)
    answers = [local.service.challenge() for _ in range(100)]
    assert local.database.opened == before
    nonces = {answer["nonce"] for answer in answers}
    assert len(nonces) == 100
    assert all(len(_nonce(answer)) == NONCE_BYTES for answer in answers)
    expires = datetime.datetime.fromisoformat(answers[0]["expires_at"])
    assert abs((expires - local.clock.now).total_seconds() - LIFETIME) < 0.01
    assert local.used_nonces() == set()


def test_release_costs_one_write_transaction(local: Local) -> None:
    nonce = _nonce(local.service.challenge())
    before = dict(local.database.opened)
    local.attest(nonce)
    assert local.database.opened["write"] == before["write"] + 1
    assert local.used_nonces() == {nonce.hex()}
    assert local.last_audit()["outcome"] == "ok"


def test_nonce_valid_until_expiry_then_refused(local: Local) -> None:
    early = _nonce(local.service.challenge())
    late = _nonce(local.service.challenge())
    local.clock.advance(LIFETIME - 1)
    local.attest(early)
    local.clock.advance(2)
    assert local.refusal(late) == "nonce expired"
    record = local.last_audit()
    assert (record["outcome"], record["reason"]) == ("refused", "nonce expired")
    assert record["session"] == local.config_id
    # An expired nonce refuses itself by its expiry time: it is never stored.
    assert local.used_nonces() == {early.hex()}


def test_used_nonces_deleted_after_margin(local: Local) -> None:
    first = _nonce(local.service.challenge())
    local.attest(first)
    local.clock.advance(NONCE_PURGE_INTERVAL + 1)
    second = _nonce(local.service.challenge())
    local.attest(second)
    assert local.used_nonces() == {first.hex(), second.hex()}

    # Past its expiry but within the clock margin, the first nonce's row stays.
    local.clock.advance(LIFETIME + NONCE_CLOCK_MARGIN / 2 - NONCE_PURGE_INTERVAL - 1)
    third = _nonce(local.service.challenge())
    local.attest(third)
    assert local.used_nonces() == {first.hex(), second.hex(), third.hex()}

    # Once the first two are past expiry plus margin, the next release deletes their rows.
    local.clock.advance(NONCE_CLOCK_MARGIN)
    fourth = _nonce(local.service.challenge())
    local.attest(fourth)
    assert local.used_nonces() == {third.hex(), fourth.hex()}
    # The forgotten nonce is still refused, by its expiry.
    assert local.refusal(first) == "nonce expired"


def test_foreign_nonce_refused_in_process(tmp_path: Path, local: Local) -> None:
    other = _local(tmp_path / "other")
    try:
        nonce = _nonce(other.service.challenge())
    finally:
        other.database.close()
    assert local.refusal(nonce) == "nonce not issued by this CAS"
    assert local.last_audit()["reason"] == "nonce not issued by this CAS"
    assert local.used_nonces() == set()


def test_same_master_key_accepts_the_nonce(tmp_path: Path) -> None:
    key = os.urandom(32)
    issuer = _local(tmp_path / "issuer", MasterKey(key))
    verifier = _local(tmp_path / "verifier", MasterKey(key))
    try:
        verifier.attest(_nonce(issuer.service.challenge()))
    finally:
        issuer.database.close()
        verifier.database.close()


# -- real CAS processes over TLS -------------------------------------------------------------


@pytest.fixture(scope="module")
def challenge_cas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasProcess]:
    server = start_cas(tmp_path_factory.mktemp("challenge") / "cas")
    yield server
    server.stop()


def _challenge(server: CasProcess) -> bytes:
    return _nonce(server.client(None)._request("POST", "/v1/attest/challenge", b"{}"))


def _post_attest(server: CasProcess, body: bytes) -> tuple[int, str]:
    try:
        server.client(None)._request("POST", "/v1/attest", body)
    except CasRejected as error:
        return error.status, str(error)
    return 200, ""


def _attest(server: CasProcess, config_id: str, nonce: bytes) -> tuple[int, str]:
    _, public = crypto.x25519_generate()
    return _post_attest(server, json.dumps(_request_body(config_id, nonce, public)).encode())


def _releases(database_url: str, config_id: str) -> list[tuple[str, str]]:
    """The (outcome, reason) of every audited release of ``config_id``, oldest first."""
    database = Database.open(database_url)
    try:
        return [
            (record["outcome"], record["reason"])
            for _, record, _, _ in audit.iter_records(database)
            if record["action"] == "release" and record["session"] == config_id
        ]
    finally:
        database.close()


def _used_nonces(database_url: str) -> set[str]:
    database = Database.open(database_url)
    try:
        with database.transaction(write=False) as tx:
            return {str(row[0]) for row in tx.execute("SELECT nonce FROM used_nonces")}
    finally:
        database.close()


def _flip_digit(text: str, index: int) -> str:
    return text[:index] + ("0" if text[index] != "0" else "1") + text[index + 1:]


# Positions in the hex nonce: format byte, random part, expiry, MAC.
ALTERATIONS = {
    "format-digit": lambda h: _flip_digit(h, 1),
    "random-digit": lambda h: _flip_digit(h, 10),
    "expiry-digit": lambda h: _flip_digit(h, 2 * (1 + 16) + 11),
    "mac-digit": lambda h: _flip_digit(h, len(h) - 1),
    "truncated": lambda h: h[:-2],
    "extended": lambda h: h + "00",
    "old-32-byte-form": lambda h: h[2:66],
}


@pytest.mark.parametrize("alteration", sorted(ALTERATIONS))
def test_altered_nonce_refused_and_audited(
    challenge_cas: CasProcess, identities: dict[str, Identity], alteration: str
) -> None:
    name = unique("alt")
    challenge_cas.client(identities["alice"]).create_session(app_yaml(name))
    config_id = f"{name}/api"
    genuine = _challenge(challenge_cas)
    altered = bytes.fromhex(ALTERATIONS[alteration](genuine.hex()))
    assert altered != genuine
    assert _attest(challenge_cas, config_id, altered) == (403, "nonce not issued by this CAS")
    # The altered nonce was not stored, so it did not use up the genuine one.
    assert _attest(challenge_cas, config_id, genuine) == (200, "")
    db = str(challenge_cas.data / "cas.db")
    releases = _releases(db, config_id)
    assert releases[0] == ("refused", "nonce not issued by this CAS")
    assert [outcome for outcome, _ in releases] == ["refused", "ok"]
    assert altered.hex() not in _used_nonces(db)


def test_foreign_cas_nonce_refused(
    challenge_cas: CasProcess, tmp_path: Path, identities: dict[str, Identity]
) -> None:
    other = start_cas(tmp_path / "other")
    try:
        nonce = _challenge(other)
    finally:
        other.stop()
    name = unique("foreign")
    challenge_cas.client(identities["alice"]).create_session(app_yaml(name))
    config_id = f"{name}/api"
    assert _attest(challenge_cas, config_id, nonce) == (403, "nonce not issued by this CAS")
    assert _releases(str(challenge_cas.data / "cas.db"), config_id) == [
        ("refused", "nonce not issued by this CAS"),
    ]


def test_expired_nonce_refused_and_audited(
    tmp_path: Path, identities: dict[str, Identity]
) -> None:
    server = start_cas(tmp_path / "cas", extra_args=("--nonce-lifetime", "0.3"))
    try:
        name = unique("exp")
        server.client(identities["alice"]).create_session(app_yaml(name))
        nonce = _challenge(server)
        threading.Event().wait(0.6)
        assert _attest(server, f"{name}/api", nonce) == (403, "nonce expired")
    finally:
        server.stop()
    db = str(tmp_path / "cas" / "cas.db")
    assert _releases(db, f"{name}/api") == [("refused", "nonce expired")]
    assert _used_nonces(db) == set()


def _file_digests(data: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(data.iterdir()) if path.name.startswith("cas.db")
    }


def test_challenges_leave_the_database_untouched(
    tmp_path: Path, identities: dict[str, Identity]
) -> None:
    server = start_cas(tmp_path / "cas")
    try:
        server.client(identities["alice"]).create_session(app_yaml(unique("quiet")))
        before = _file_digests(server.data)
        assert "cas.db" in before
        nonces = {_challenge(server) for _ in range(100)}
        assert len(nonces) == 100
        assert _file_digests(server.data) == before
    finally:
        server.stop()
    assert _used_nonces(str(tmp_path / "cas" / "cas.db")) == set()


def _race(servers: list[CasProcess], config_id: str, nonce: bytes) -> list[tuple[int, str]]:
    """Send RACERS attestations naming ``nonce`` at once, spread over ``servers``."""
    _, public = crypto.x25519_generate()
    body = json.dumps(_request_body(config_id, nonce, public)).encode()
    barrier = threading.Barrier(RACERS)

    def attempt(index: int) -> tuple[int, str]:
        barrier.wait()
        return _post_attest(servers[index % len(servers)], body)

    with ThreadPoolExecutor(RACERS) as pool:
        return sorted(pool.map(attempt, range(RACERS)))


def _check_race(servers: list[CasProcess], database_url: str, identity: Identity) -> None:
    name = unique("race")
    servers[0].client(identity).create_session(app_yaml(name))
    config_id = f"{name}/api"
    for _ in range(3):
        nonce = _challenge(servers[-1])
        outcomes = _race(servers, config_id, nonce)
        assert outcomes == [(200, "")] + [(403, "nonce already used")] * (RACERS - 1)
        assert nonce.hex() in _used_nonces(database_url)
    releases = _releases(database_url, config_id)
    assert [outcome for outcome, _ in releases].count("ok") == 3
    assert releases.count(("refused", "nonce already used")) == 3 * (RACERS - 1)


def test_racing_uses_release_once_sqlite(
    challenge_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    _check_race([challenge_cas], str(challenge_cas.data / "cas.db"), identities["alice"])


@pytest.fixture
def postgres_pair(postgres_url: str, tmp_path: Path) -> Iterator[list[CasProcess]]:
    """Two CAS processes sharing a data directory (so a master key) and a PostgreSQL database."""
    first = start_cas(tmp_path / "cas", db=postgres_url)
    try:
        second = start_cas(tmp_path / "cas", db=postgres_url)
        try:
            yield [first, second]
        finally:
            second.stop()
    finally:
        first.stop()


@pytest.mark.postgres
def test_racing_uses_release_once_postgres(
    postgres_pair: list[CasProcess], postgres_url: str, identities: dict[str, Identity]
) -> None:
    _check_race(postgres_pair, postgres_url, identities["alice"])


# -- databases made by schema version 1 ------------------------------------------------------


def _version_1_statements() -> list[tuple[str, tuple[Any, ...]]]:
    """The schema as version 1 of the CAS left it, with a nonce it had issued."""
    return [
        ("CREATE TABLE schema_version (version INTEGER NOT NULL)", ()),
        ("INSERT INTO schema_version (version) VALUES (1)", ()),
        *((statement, ()) for statement in MIGRATIONS[0]),
        ("INSERT INTO nonces (nonce, expires_at, consumed_at) VALUES (?, ?, NULL)",
         ("ab" * 32, 4102444800.0)),
    ]


def _tables(database: Database) -> set[str]:
    query = (
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'" if database.is_postgres
        else "SELECT name FROM sqlite_master WHERE type = 'table'"
    )
    with database.transaction(write=False) as tx:
        return {str(row[0]) for row in tx.execute(query)}


def _check_upgrade(
    database: Database, data: Path, db: str | None, database_url: str, identity: Identity
) -> None:
    head = HeadFile(data / audit.HEAD_FILE)
    with database.transaction(write=True) as tx:
        position = audit.append(
            tx, AuditRecord(action="create", client=ALICE, session="before", outcome="ok"),
            now=datetime.datetime.now(datetime.UTC),
        )
    head.advance(*position)
    database.close()

    server = start_cas(data, db=db)
    try:
        name = unique("upgraded")
        server.client(identity).create_session(app_yaml(name))
        nonce = _challenge(server)
        assert _attest(server, f"{name}/api", nonce) == (200, "")
        assert _attest(server, f"{name}/api", nonce) == (403, "nonce already used")
    finally:
        server.stop()
    upgraded = Database.open(database_url)
    try:
        assert upgraded.migrate() == SCHEMA_VERSION
        tables = _tables(upgraded)
        assert "nonces" not in tables
        assert "used_nonces" in tables
        result = audit.verify_chain(upgraded, head)
        assert result.ok, result.problems
        assert result.records == 4  # the old record, the creation, two releases
    finally:
        upgraded.close()


def test_version_1_sqlite_database_upgraded(
    tmp_path: Path, identities: dict[str, Identity]
) -> None:
    data = tmp_path / "cas"
    data.mkdir()
    database = Database.open(str(data / "cas.db"))
    with database.transaction(write=True) as tx:
        for statement, params in _version_1_statements():
            tx.execute(statement, params)
    _check_upgrade(database, data, None, str(data / "cas.db"), identities["alice"])


@pytest.mark.postgres
def test_version_1_postgres_database_upgraded(
    postgres_url: str, tmp_path: Path, identities: dict[str, Identity]
) -> None:
    # A write transaction locks the audit head row first, which version 1 creates: build it
    # on a plain connection.
    with psycopg.connect(postgres_url) as connection, connection.cursor() as cursor:
        for statement, params in _version_1_statements():
            cursor.execute(statement.replace("?", "%s"), params)
    database = Database.open(postgres_url)
    _check_upgrade(database, tmp_path / "cas", postgres_url, postgres_url, identities["alice"])
