"""The CAS's database: SQLite by default, PostgreSQL for several CAS processes.

One small layer hides the two, and SQL is written once with ``?`` placeholders. Write
transactions are serialised across every process using the database: SQLite takes its write
lock with ``BEGIN IMMEDIATE``, and on PostgreSQL every writer first locks the audit head row,
which every write updates anyway. That makes the conditional session update and the audit
chain append race-free without relying on isolation levels. A nonce's second use is also
refused by the primary key of ``used_nonces``.

The schema is versioned: :data:`MIGRATIONS` lists the steps, and :meth:`Database.migrate`
applies the missing ones under a lock so that CAS processes starting together agree.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from enclavify.errors import CasError

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64

# Each entry is one schema version; the statements run in one transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE sessions (
            name TEXT PRIMARY KEY,
            hash TEXT NOT NULL,
            revision BIGINT NOT NULL,
            creator TEXT NOT NULL,
            sealed TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE session_history (
            name TEXT NOT NULL,
            revision BIGINT NOT NULL,
            hash TEXT NOT NULL,
            predecessor TEXT,
            client TEXT NOT NULL,
            created_at TEXT NOT NULL,
            sealed TEXT NOT NULL,
            PRIMARY KEY (name, revision)
        )""",
        """CREATE TABLE nonces (
            nonce TEXT PRIMARY KEY,
            expires_at DOUBLE PRECISION NOT NULL,
            consumed_at DOUBLE PRECISION
        )""",
        "CREATE INDEX nonces_expiry ON nonces (expires_at)",
        """CREATE TABLE audit_log (
            seq BIGINT PRIMARY KEY,
            record TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""",
        """CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY,
            seq BIGINT NOT NULL,
            hash TEXT NOT NULL
        )""",
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '" + GENESIS_HASH + "')",  # noqa: S608
    ),
    # Version 2: challenge nonces carry their own expiry and a MAC, so issuing one writes
    # nothing. Only nonces named by an attestation are stored, to refuse a second use, until
    # a while after they expire. Nonces issued under version 1 fail the MAC check, so the
    # old table is dropped rather than carried over.
    (
        "DROP TABLE nonces",
        """CREATE TABLE used_nonces (
            nonce TEXT PRIMARY KEY,
            expires_at DOUBLE PRECISION NOT NULL,
            used_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX used_nonces_expiry ON used_nonces (expires_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# Arbitrary key for PostgreSQL's advisory lock around migrations.
_MIGRATION_LOCK = 0x656E636C


class Transaction(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    @property
    def rowcount(self) -> int: ...


class Database:
    """A connection pool and transactions for one SQLite file or PostgreSQL database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_postgres = url.startswith(("postgresql://", "postgres://"))

    @staticmethod
    def open(url: str, *, pool_size: int = 8) -> Database:
        if url.startswith(("postgresql://", "postgres://")):
            return PostgresDatabase(url, pool_size=pool_size)
        if url.startswith("sqlite:///"):
            return SqliteDatabase(Path(url[len("sqlite://"):]))
        if "://" in url:
            raise CasError(f"unsupported database URL {redact_url(url)!r}: expected"
                           " postgresql://… or sqlite:///PATH")
        if _KEYWORD_FORM.search(url):
            # A libpq "host=… password=…" string would otherwise become an SQLite file name,
            # and quoting it back could show the password, so it is not quoted.
            raise CasError("the database looks like a key=value PostgreSQL connection string;"
                           " give it as a postgresql://USER@HOST/DBNAME URL (or an SQLite file"
                           " as sqlite:///PATH)")
        return SqliteDatabase(Path(url))

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[Transaction]:
        raise NotImplementedError
        yield  # pragma: no cover

    def migrate(self) -> int:
        """Bring the schema to :data:`SCHEMA_VERSION`; returns the version found before."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


_PASSWORD_PARAMETER = re.compile(
    r"((?:^|[?&\s])password\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s&#]*)", re.IGNORECASE
)
# The start of a libpq keyword/value connection string ("host=db dbname=cas ..."). An SQLite
# file whose name happens to start this way is still accepted as sqlite:///PATH.
_KEYWORD_FORM = re.compile(r"^\s*[A-Za-z_]+\s*=")


def redact_url(url: str) -> str:
    """Return ``url`` without a password, for messages and logs.

    libpq takes a password in the user information (``user:secret@host``) and in the
    ``password`` query parameter (or ``password=`` keyword); both are replaced by ``***``.
    """
    url = _PASSWORD_PARAMETER.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    credentials, _, host = rest.partition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def _apply_migrations(tx: Transaction, database: str) -> int:
    tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    rows = tx.execute("SELECT version FROM schema_version")
    current = int(rows[0][0]) if rows else 0
    if not rows:
        tx.execute("INSERT INTO schema_version (version) VALUES (0)")
    if current > SCHEMA_VERSION:
        raise CasError(
            f"{database} has schema version {current}, newer than this CAS ({SCHEMA_VERSION});"
            " upgrade enclavify"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version - 1]:
            tx.execute(statement)
        tx.execute("UPDATE schema_version SET version = ?", (version,))
        log.debug("migrated %s to schema version %d", database, version)
    return current


# -- SQLite ----------------------------------------------------------------------------------


class _SqliteTransaction:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self._rowcount = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self._connection.execute(sql, tuple(params))
        rows = cursor.fetchall()
        self._rowcount = cursor.rowcount
        return rows

    @property
    def rowcount(self) -> int:
        return self._rowcount


class SqliteDatabase(Database):
    """SQLite in WAL mode with ``synchronous=FULL``: a commit is on disk before it returns."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"sqlite:///{path}")
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            try:
                if not self.path.exists():
                    # SQLite gives its -wal and -shm files the database file's mode.
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
                connection = sqlite3.connect(
                    self.path, isolation_level=None, timeout=30.0, check_same_thread=False
                )
            except (OSError, sqlite3.Error) as error:
                raise CasError(f"cannot open the database {self.path}: {error}") from error
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[Transaction]:
        connection = self._connection()
        try:
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as error:
            raise CasError(f"database {self.path} is unavailable: {error}") from error
        try:
            yield _SqliteTransaction(connection)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        try:
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            connection.execute("ROLLBACK")
            raise CasError(f"commit to {self.path} failed: {error}") from error

    def migrate(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.transaction(write=True) as tx:
            return _apply_migrations(tx, str(self.path))

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()


# -- PostgreSQL ------------------------------------------------------------------------------


class _PostgresTransaction:
    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cursor.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(params))
        if self._cursor.description is None:
            return []
        return list(self._cursor.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


class PostgresDatabase(Database):
    """PostgreSQL through psycopg 3, with a small pool of connections."""

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        super().__init__(url)
        # Imported here, not at the top: loading the driver costs about 0.1 s, and every
        # command-line call (image conversion included) would pay it for SQLite-only use.
        import psycopg  # noqa: PLC0415

        self._psycopg: Any = psycopg
        self._pool: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        try:
            connection = self._psycopg.connect(self.url, connect_timeout=10)
        except self._psycopg.Error as error:
            raise CasError(
                f"cannot connect to {redact_url(self.url)}: {str(error).strip()}"
            ) from error
        with self._lock:
            self._all.append(connection)
        return connection

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[Transaction]:
        self._slots.acquire()
        try:
            try:
                connection = self._pool.get_nowait()
            except queue.Empty:
                connection = self._connect()
            if connection.closed or connection.broken:
                connection = self._connect()
            healthy = False
            try:
                with connection.transaction(), connection.cursor() as cursor:
                    tx = _PostgresTransaction(cursor)
                    if write:
                        # Every writer takes this row lock first, so writers run one at a time
                        # across all CAS processes sharing the database.
                        tx.execute("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")
                    yield tx
                healthy = True
            except self._psycopg.Error as error:
                raise CasError(
                    f"database {redact_url(self.url)} failed: {str(error).strip()}"
                ) from error
            finally:
                if healthy or not (connection.closed or connection.broken):
                    self._pool.put(connection)
        finally:
            self._slots.release()

    def migrate(self) -> int:
        connection = self._connect()
        try:
            with connection.transaction(), connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                return _apply_migrations(_PostgresTransaction(cursor), redact_url(self.url))
        except self._psycopg.Error as error:
            raise CasError(f"migrating {redact_url(self.url)} failed: {error}") from error
        finally:
            self._pool.put(connection)

    def close(self) -> None:
        with self._lock:
            for connection in self._all:
                connection.close()
            self._all.clear()
