"""The hash-chained audit log.

Every session change and every release or refusal of a configuration appends one record:
time, client key hash, session, hash before and after, action, outcome and reason. Each
record's hash is SHA-256 over the previous record's hash and the record's canonical JSON, so
altering, inserting or removing a record in the middle breaks every later hash.

What the chain alone cannot show is the loss of its newest records (a database restored
from an old backup, or rows deleted at the end). For that the CAS keeps the head (count and
hash of the newest record it wrote) in a file in its data directory, written atomically after
each commit. :func:`verify_chain` reports the database as truncated when it holds fewer
records than the head file or a different record at the head's position. Not detected: a
rollback of both the database and the head file together (for example a restored backup of
the whole data directory), and records written by another CAS process with a different data
directory beyond the last head this directory saw.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclavify import atomic
from enclavify.cas.storage import GENESIS_HASH, Database, Transaction
from enclavify.errors import CasError

HEAD_FILE = "audit-head.json"


@dataclass(frozen=True)
class AuditRecord:
    """One audited event. ``client`` is a key hash or ``"anonymous"``."""

    action: str
    client: str
    session: str
    outcome: str
    reason: str = ""
    hash_before: str | None = None
    hash_after: str | None = None
    time: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "action": self.action,
            "client": self.client,
            "session": self.session,
            "hash_before": self.hash_before,
            "hash_after": self.hash_after,
            "outcome": self.outcome,
            "reason": self.reason,
        }


def record_hash(prev_hash: str, record_json: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{record_json}".encode()).hexdigest()


def canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def append(tx: Transaction, record: AuditRecord, *, now: datetime.datetime) -> tuple[int, str]:
    """Append ``record`` inside a write transaction; returns its sequence number and hash."""
    rows = tx.execute("SELECT seq, hash FROM audit_head WHERE id = 1")
    seq, prev_hash = int(rows[0][0]) + 1, str(rows[0][1])
    body = record.to_dict()
    body["time"] = now.astimezone(datetime.UTC).isoformat(timespec="microseconds")
    record_json = canonical(body)
    digest = record_hash(prev_hash, record_json)
    tx.execute(
        "INSERT INTO audit_log (seq, record, prev_hash, hash) VALUES (?, ?, ?, ?)",
        (seq, record_json, prev_hash, digest),
    )
    tx.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))
    return seq, digest


class HeadFile:
    """The newest audit head this data directory has seen, kept outside the database."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[int, str] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise CasError(f"audit head file {self.path} is unreadable: {error}") from error
        if not isinstance(data, dict):
            data = {}
        seq, digest = data.get("seq"), data.get("hash")
        # bool is an int subclass, and JSON true is no sequence number.
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(digest, str):
            raise CasError(
                f"audit head file {self.path} is invalid: expected an object with an integer"
                " 'seq' and a string 'hash'"
            )
        return seq, digest

    def advance(self, seq: int, digest: str) -> None:
        """Record ``(seq, digest)`` unless the file already names a later record.

        A lock file serialises processes sharing the data directory, so a slower writer
        never moves the head backwards.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read()
            if current is not None and current[0] >= seq:
                return
            record = json.dumps({"seq": seq, "hash": digest}).encode("ascii")
            atomic.write_bytes(self.path, record, mode=0o600)


@dataclass(frozen=True)
class VerifyResult:
    records: int
    head_hash: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def iter_records(database: Database) -> Iterator[tuple[int, dict[str, Any], str, str]]:
    """Yield ``(seq, record, prev_hash, hash)`` in order."""
    with database.transaction(write=False) as tx:
        rows = tx.execute("SELECT seq, record, prev_hash, hash FROM audit_log ORDER BY seq")
    for seq, record_json, prev_hash, digest in rows:
        yield int(seq), json.loads(record_json), str(prev_hash), str(digest)


def verify_chain(database: Database, head_file: HeadFile | None) -> VerifyResult:
    """Check every link of the chain, the database's head row and the head file."""
    problems: list[str] = []
    expected_prev = GENESIS_HASH
    expected_seq = 1
    count = 0
    by_seq: dict[int, str] = {}
    with database.transaction(write=False) as tx:
        rows = tx.execute("SELECT seq, record, prev_hash, hash FROM audit_log ORDER BY seq")
        head_rows = tx.execute("SELECT seq, hash FROM audit_head WHERE id = 1")
    for seq_value, record_json, prev_hash, digest in rows:
        seq = int(seq_value)
        count += 1
        if seq != expected_seq:
            problems.append(f"record {expected_seq} is missing (next is {seq})")
        if prev_hash != expected_prev:
            problems.append(f"record {seq} does not link to the record before it")
        if record_hash(str(prev_hash), str(record_json)) != digest:
            problems.append(f"record {seq} was altered (its hash does not match its content)")
        by_seq[seq] = str(digest)
        expected_prev = str(digest)
        expected_seq = seq + 1
    db_head_seq, db_head_hash = int(head_rows[0][0]), str(head_rows[0][1])
    if (db_head_seq, db_head_hash) != (expected_seq - 1, expected_prev):
        problems.append(
            f"the database's head row names record {db_head_seq}, but the chain ends at"
            f" record {expected_seq - 1}"
        )
    if head_file is not None:
        saved = head_file.read()
        if saved is not None:
            saved_seq, saved_hash = saved
            if saved_seq > expected_seq - 1:
                problems.append(
                    f"the log was truncated: {head_file.path} names record {saved_seq}, the"
                    f" database ends at record {expected_seq - 1}"
                )
            elif by_seq.get(saved_seq) != saved_hash:
                problems.append(
                    f"record {saved_seq} differs from the one {head_file.path} recorded"
                    " (log replaced or rewritten)"
                )
    return VerifyResult(count, expected_prev, tuple(problems))
