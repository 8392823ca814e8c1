"""The CAS's operations, independent of HTTP: sessions, access control, attested release.

Every method takes the caller's client key hash (``None`` for a caller without a client
certificate) and either returns plain data or raises :class:`CasRejected` with the HTTP
status and a reason that is safe to show the caller. The reasons never contain secret values.

Access rules:

- Without a client certificate a caller may only read ``export_public`` values, ask for a
  challenge and attest.
- ``access_policy`` lists (``read``, ``update``, ``create_sessions``) hold ``CREATOR`` (the key
  hash of the client that created the session), ``ANY`` (any client with a certificate),
  ``NONE`` or key hashes.
- A namespace is a session: creating ``ns/x`` needs ``create_sessions`` on ``ns``; top-level
  sessions may be created by any client with a certificate.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from enclavify import crypto, policy
from enclavify import secrets as secrets_module
from enclavify.attest import report_data as report_data_module
from enclavify.attest.claims import SIMULATION
from enclavify.attest.verify import verify_evidence
from enclavify.cas import audit
from enclavify.cas.audit import AuditRecord, HeadFile
from enclavify.cas.masterkey import MasterKey
from enclavify.cas.storage import Database, Transaction
from enclavify.errors import AttestationError, CasRejected, PolicyError, SecretError
from enclavify.policy.claims import check_claims
from enclavify.policy.model import ANY, CREATOR, NONE, Session

log = logging.getLogger(__name__)

CONFIG_INFO = b"enclavify-config-v1"
# The HKDF label of the key that authenticates challenge nonces.
NONCE_KEY_INFO = b"enclavify-cas-challenge-nonce-v1"
_NONCE_FORMAT = b"\x01"
_NONCE_RANDOM = 16
_NONCE_MAC = 16  # truncated HMAC-SHA256
NONCE_BYTES = len(_NONCE_FORMAT) + _NONCE_RANDOM + 8 + _NONCE_MAC
# A nonce longer than this makes the attestation request malformed (400). Any other length
# but NONCE_BYTES is refused and audited as a nonce this CAS did not issue.
MAX_NONCE_BYTES = 256
# How long used nonces are kept past their expiry, and how often they are cleared out.
NONCE_CLOCK_MARGIN = 300.0
NONCE_PURGE_INTERVAL = 60.0
ANONYMOUS = "anonymous"

Clock = Callable[[], datetime.datetime]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def refuse(status: HTTPStatus, reason: str) -> CasRejected:
    return CasRejected(reason, int(status))


@dataclass(frozen=True)
class StoredSession:
    """A session as read from the database, opened with the master key."""

    name: str
    hash: str
    revision: int
    creator: str
    session: Session
    values: Mapping[str, Any]
    definitions: Mapping[str, str]


def may(entries: tuple[str, ...], client: str | None, creator: str) -> bool:
    """Return whether ``client`` is named by an access policy list."""
    if client is None:
        return False
    for entry in entries:
        if entry == NONE:
            continue
        if entry == ANY:
            return True
        if entry == CREATOR and hmac.compare_digest(client, creator):
            return True
        if entry.lower() == client:
            return True
    return False


def definition_fingerprint(definition: Any) -> str:
    """Hash a secret definition: an update keeps a value only while its definition is unchanged."""
    encoded = json.dumps(dataclasses.asdict(definition), sort_keys=True, default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


class CasService:
    """The CAS's operations over one database, master key and audit head file."""

    def __init__(
        self,
        database: Database,
        master_key: MasterKey,
        head_file: HeadFile | None,
        *,
        clock: Clock = _utc_now,
        nonce_lifetime: float = 60.0,
    ) -> None:
        self.database = database
        self.master_key = master_key
        self.head_file = head_file
        self.clock = clock
        self.nonce_lifetime = nonce_lifetime
        self._cache: OrderedDict[tuple[str, str], StoredSession] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._nonce_key = master_key.derive_key(NONCE_KEY_INFO)
        self._last_purge = float("-inf")

    # -- storage helpers ------------------------------------------------------------------

    def _load(self, tx: Transaction, name: str) -> StoredSession | None:
        rows = tx.execute(
            "SELECT hash, revision, creator, sealed FROM sessions WHERE name = ?", (name,)
        )
        if not rows:
            return None
        digest, revision, creator, sealed = rows[0]
        key = (name, str(digest))
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        stored = self._open(name, str(digest), int(revision), str(creator), str(sealed))
        with self._cache_lock:
            self._cache[key] = stored
            while len(self._cache) > 256:
                self._cache.popitem(last=False)
        return stored

    def _open(
        self, name: str, digest: str, revision: int, creator: str, sealed: str
    ) -> StoredSession:
        record = json.loads(self.master_key.open(sealed, f"session:{name}:{digest}"))
        session = policy.parse_session(record["text"])
        values = {
            secret: secrets_module.SecretValue.from_json(value)
            for secret, value in record["values"].items()
        }
        return StoredSession(
            name, digest, revision, creator, session, values, dict(record["definitions"])
        )

    def _audit(self, tx: Transaction, record: AuditRecord) -> tuple[int, str]:
        return audit.append(tx, record, now=self.clock())

    def _advance_head(self, head: tuple[int, str]) -> None:
        if self.head_file is not None:
            self.head_file.advance(*head)

    def _audit_alone(self, record: AuditRecord) -> None:
        with self.database.transaction(write=True) as tx:
            head = self._audit(tx, record)
        self._advance_head(head)

    # -- sessions -------------------------------------------------------------------------

    def submit_session(self, text: bytes, client: str | None) -> dict[str, Any]:
        """Create a session, or update it when the document names a ``predecessor``."""
        if client is None:
            raise refuse(HTTPStatus.FORBIDDEN, "a client certificate is required to write sessions")
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise refuse(HTTPStatus.BAD_REQUEST, f"session is not UTF-8: {error}") from error
        try:
            session = policy.parse_session(text)
        except PolicyError as error:
            raise refuse(HTTPStatus.BAD_REQUEST, f"invalid session: {error.diagnostics()}") \
                from error
        action = "update" if session.predecessor else "create"
        try:
            if session.predecessor:
                return self._update(session, text, client)
            return self._create(session, text, client)
        except CasRejected as error:
            self._audit_alone(AuditRecord(
                action=action, client=client, session=session.name, outcome="refused",
                reason=str(error), hash_before=session.predecessor,
            ))
            log.info("rejected %s of session %s by %s: %s", action, session.name, client, error)
            raise

    def _create(self, session: Session, text: bytes, client: str) -> dict[str, Any]:
        with self.database.transaction(write=False) as tx:
            self._check_creation(tx, session, client)
        values, definitions = self._generate(session, {}, {})
        digest = policy.session_hash(session)
        sealed = self._seal(session.name, digest, text, values, definitions)
        now = self.clock().isoformat()
        with self.database.transaction(write=True) as tx:
            # Checked again under the write lock: the namespace may have changed meanwhile.
            self._check_creation(tx, session, client)
            tx.execute(
                "INSERT INTO sessions (name, hash, revision, creator, sealed, updated_at)"
                " VALUES (?, ?, 1, ?, ?, ?)",
                (session.name, digest, client, sealed, now),
            )
            self._insert_history(tx, session.name, 1, digest, None, client, now, sealed)
            head = self._audit(tx, AuditRecord(
                action="create", client=client, session=session.name, outcome="ok",
                hash_after=digest,
            ))
        self._advance_head(head)
        log.debug("created session %s (%s)", session.name, digest)
        return {"name": session.name, "hash": digest, "revision": 1}

    def _check_creation(self, tx: Transaction, session: Session, client: str) -> None:
        """Raise unless the name is free and ``client`` may create sessions in its namespace."""
        if tx.execute("SELECT 1 FROM sessions WHERE name = ?", (session.name,)):
            raise refuse(
                HTTPStatus.CONFLICT,
                f"session {session.name!r} already exists; update it with a predecessor",
            )
        namespace = session.namespace
        if namespace is None:
            return
        parent = self._load(tx, namespace)
        if parent is None:
            raise refuse(HTTPStatus.NOT_FOUND, f"namespace {namespace!r} does not exist")
        if not may(parent.session.access_policy.create_sessions, client, parent.creator):
            raise refuse(
                HTTPStatus.FORBIDDEN,
                f"client {client} may not create sessions in namespace {namespace!r}",
            )

    def _update(self, session: Session, text: bytes, client: str) -> dict[str, Any]:
        with self.database.transaction(write=False) as tx:
            current = self._load(tx, session.name)
        if current is None:
            raise refuse(HTTPStatus.NOT_FOUND, f"session {session.name!r} does not exist")
        if not may(current.session.access_policy.update, client, current.creator):
            raise refuse(
                HTTPStatus.FORBIDDEN, f"client {client} may not update session {session.name!r}"
            )
        if session.predecessor != current.hash:
            raise refuse(
                HTTPStatus.CONFLICT,
                f"predecessor {session.predecessor} is not the current hash of"
                f" {session.name!r} ({current.hash})",
            )
        values, definitions = self._generate(session, current.values, current.definitions)
        digest = policy.session_hash(session)
        sealed = self._seal(session.name, digest, text, values, definitions)
        now = self.clock().isoformat()
        revision = current.revision + 1
        with self.database.transaction(write=True) as tx:
            # The conditional update is the arbiter: of two updates naming the same
            # predecessor, only the first to commit finds the hash unchanged.
            tx.execute(
                "UPDATE sessions SET hash = ?, revision = ?, sealed = ?, updated_at = ?"
                " WHERE name = ? AND hash = ?",
                (digest, revision, sealed, now, session.name, current.hash),
            )
            if tx.rowcount != 1:
                raise refuse(
                    HTTPStatus.CONFLICT,
                    f"session {session.name!r} changed concurrently; predecessor"
                    f" {session.predecessor} is no longer current",
                )
            self._insert_history(
                tx, session.name, revision, digest, current.hash, client, now, sealed
            )
            head = self._audit(tx, AuditRecord(
                action="update", client=client, session=session.name, outcome="ok",
                hash_before=current.hash, hash_after=digest,
            ))
        self._advance_head(head)
        log.debug("updated session %s to %s", session.name, digest)
        return {"name": session.name, "hash": digest, "revision": revision}

    @staticmethod
    def _insert_history(  # noqa: PLR0917
        tx: Transaction, name: str, revision: int, digest: str, predecessor: str | None,
        client: str, now: str, sealed: str,
    ) -> None:
        tx.execute(
            "INSERT INTO session_history (name, revision, hash, predecessor, client,"
            " created_at, sealed) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, revision, digest, predecessor, client, now, sealed),
        )

    def _seal(
        self, name: str, digest: str, text: bytes, values: Mapping[str, Any],
        definitions: Mapping[str, str],
    ) -> str:
        record = {
            "text": text.decode("utf-8"),
            "values": {secret: value.to_json() for secret, value in values.items()},
            "definitions": dict(definitions),
        }
        return self.master_key.seal(json.dumps(record).encode(), f"session:{name}:{digest}")

    def _generate(
        self, session: Session, previous: Mapping[str, Any], previous_definitions: Mapping[str, str]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Generate the session's secrets, keeping earlier values whose definition is unchanged."""
        definitions = {d.name: definition_fingerprint(d) for d in session.secrets}
        if not session.secrets:
            return {}, definitions
        existing = {
            name: value for name, value in previous.items()
            if previous_definitions.get(name) == definitions.get(name)
        }
        try:
            values = secrets_module.generate_secrets(
                session, existing, lambda other, secret: self._imported(session.name, other, secret)
            )
        except (SecretError, PolicyError) as error:
            raise refuse(HTTPStatus.BAD_REQUEST, f"secrets: {error.diagnostics()}") from error
        return dict(values), definitions

    def _imported(self, importer: str, exporter_name: str, secret: str) -> Any:
        """Return ``exporter_name``'s secret if it exports it to ``importer``."""
        with self.database.transaction(write=False) as tx:
            exporter = self._load(tx, exporter_name)
        if exporter is None:
            raise SecretError(f"imported secret {secret!r}: session {exporter_name!r} not found")
        definition = exporter.session.secret(secret)
        if definition is None or secret not in exporter.values:
            raise SecretError(f"session {exporter_name!r} has no secret {secret!r}")
        if importer not in definition.export and "*" not in definition.export:
            raise SecretError(
                f"session {exporter_name!r} does not export secret {secret!r} to {importer!r}"
            )
        return exporter.values[secret]

    def get_session(self, name: str, client: str | None) -> dict[str, Any]:
        current = self._readable(name, client)
        return {
            "name": current.name,
            "hash": current.hash,
            "revision": current.revision,
            "creator": current.creator,
            "session": policy.redacted(current.session),
        }

    def session_history(self, name: str, client: str | None) -> dict[str, Any]:
        self._readable(name, client)
        with self.database.transaction(write=False) as tx:
            rows = tx.execute(
                "SELECT revision, hash, predecessor, client, created_at FROM session_history"
                " WHERE name = ? ORDER BY revision",
                (name,),
            )
        return {
            "name": name,
            "history": [
                {"revision": int(r[0]), "hash": r[1], "predecessor": r[2], "client": r[3],
                 "created_at": r[4]}
                for r in rows
            ],
        }

    def _readable(self, name: str, client: str | None) -> StoredSession:
        if client is None:
            raise refuse(HTTPStatus.FORBIDDEN, "a client certificate is required to read sessions")
        with self.database.transaction(write=False) as tx:
            current = self._load(tx, name)
        # An unauthorised caller learns nothing, not even whether the session exists.
        if current is None or not may(current.session.access_policy.read, client, current.creator):
            raise refuse(
                HTTPStatus.NOT_FOUND, f"session {name!r} not found or not readable by {client}"
            )
        return current

    def public_values(self, name: str) -> dict[str, Any]:
        """Return the ``export_public`` values of a session; no client certificate needed."""
        with self.database.transaction(write=False) as tx:
            current = self._load(tx, name)
        if current is None:
            raise refuse(HTTPStatus.NOT_FOUND, f"session {name!r} not found")
        values: dict[str, str] = {}
        for definition in current.session.secrets:
            if not definition.export_public or definition.name not in current.values:
                continue
            public = current.values[definition.name].public_value()
            if public is not None:
                values[definition.name] = public
        return {"session": name, "values": values}

    # -- attestation ----------------------------------------------------------------------

    def challenge(self) -> dict[str, Any]:
        """Issue a nonce that proves itself: nothing is written to the database.

        The nonce is a format byte, random bytes, the expiry (milliseconds since the epoch)
        and a MAC over them under a key derived from the master key, so every CAS process
        sharing the master key accepts it and no other CAS does.
        """
        expires = self.clock() + datetime.timedelta(seconds=self.nonce_lifetime)
        expires_ms = int(expires.timestamp() * 1000)
        body = _NONCE_FORMAT + os.urandom(_NONCE_RANDOM) + expires_ms.to_bytes(8, "big")
        nonce = body + self._nonce_mac(body)
        expires_at = datetime.datetime.fromtimestamp(expires_ms / 1000, datetime.UTC)
        return {"nonce": nonce.hex(), "expires_at": expires_at.isoformat()}

    def _nonce_mac(self, body: bytes) -> bytes:
        return hmac.new(self._nonce_key, body, hashlib.sha256).digest()[:_NONCE_MAC]

    def _verify_nonce(self, nonce: bytes) -> float:
        """Return the expiry (POSIX seconds) of ``nonce``, from the nonce alone.

        Raises:
            AttestationError: this CAS did not issue the nonce (malformed or wrong MAC), or
                it has expired.
        """
        if len(nonce) != NONCE_BYTES or nonce[:1] != _NONCE_FORMAT:
            raise AttestationError("nonce not issued by this CAS")
        body, mac = nonce[:-_NONCE_MAC], nonce[-_NONCE_MAC:]
        if not hmac.compare_digest(mac, self._nonce_mac(body)):
            raise AttestationError("nonce not issued by this CAS")
        expires = int.from_bytes(body[-8:], "big") / 1000
        if expires < self.clock().timestamp():
            raise AttestationError("nonce expired")
        return expires

    def _finish_attestation(
        self, nonce: str, expires: float | None, record: AuditRecord
    ) -> str | None:
        """Mark ``nonce`` used and append ``record`` in one transaction.

        ``expires`` is None for a nonce this CAS did not issue or that had expired: such a
        nonce is never stored, its MAC or expiry refuses it every time. Any other nonce is
        stored whatever the outcome, so one piece of evidence serves at most one request.
        The primary key lets only one insert of a nonce through, so of two racing requests
        the second finds the nonce used. When ``record`` is a release but the nonce turned
        out to be used or expired meanwhile, the record is written as a refusal instead and
        the reason is returned. Otherwise the result is None.
        """
        now = self.clock().timestamp()
        problem: str | None = None
        with self.database.transaction(write=True) as tx:
            if expires is not None:
                tx.execute(
                    "INSERT INTO used_nonces (nonce, expires_at, used_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (nonce) DO NOTHING",
                    (nonce, expires, now),
                )
                first_use = tx.rowcount == 1
                if record.outcome == "ok":
                    if not first_use:
                        problem = "nonce already used"
                    elif expires < now:
                        problem = "nonce expired"
                    if problem is not None:
                        record = dataclasses.replace(record, outcome="refused", reason=problem)
                self._forget_expired_nonces(tx, now)
            head = self._audit(tx, record)
        self._advance_head(head)
        return problem

    def _forget_expired_nonces(self, tx: Transaction, now: float) -> None:
        """Delete used nonces more than the clock margin past expiry, at most once per interval.

        An expired nonce is refused by its own expiry time, so its row is no longer needed.
        The margin is for CAS processes on one database whose clocks differ: a process whose
        clock lags by less than the margin still finds the row while it takes the nonce as
        unexpired.
        """
        if now - self._last_purge < NONCE_PURGE_INTERVAL:
            return
        self._last_purge = now
        tx.execute("DELETE FROM used_nonces WHERE expires_at < ?", (now - NONCE_CLOCK_MARGIN,))

    def attest(self, body: Any, client: str | None) -> dict[str, Any]:
        """Check evidence and return the service's configuration sealed to the launcher's key.

        The nonce's MAC and expiry are checked first, from the nonce alone, then whether it
        was used (read only), then the evidence. All checks run before anything is written;
        then one transaction marks the nonce used and appends the audit record, so a
        release costs a single commit.
        """
        request = _parse_attest_request(body)
        nonce = request.nonce.hex()
        session_name, _, service_name = request.config_id.rpartition("/")
        who = client or ANONYMOUS
        session_hash: str | None = None
        expires: float | None = None
        try:
            expires = self._verify_nonce(request.nonce)
            with self.database.transaction(write=False) as tx:
                if tx.execute("SELECT 1 FROM used_nonces WHERE nonce = ?", (nonce,)):
                    raise AttestationError("nonce already used")
                current = self._load(tx, session_name) if session_name else None
            if current is None:
                raise AttestationError(f"unknown session {session_name!r}")
            session_hash = current.hash
            if current.session.service(service_name) is None:
                raise AttestationError(
                    f"session {session_name!r} has no service {service_name!r}"
                )
            if (request.evidence_type == SIMULATION
                    and not current.session.attestation.accepts_simulation):
                raise AttestationError(
                    f"simulation evidence is not accepted by session {session_name!r}"
                    f" (security.attestation.mode is {current.session.attestation.mode!r})"
                )
            claims = verify_evidence(request.evidence_type, request.evidence, now=self.clock())
            expected = report_data_module.bind(request.nonce, request.public_key)
            if not hmac.compare_digest(expected, claims.report_data):
                raise AttestationError(
                    "report data does not bind the challenge nonce and the public key"
                )
            warnings = check_claims(current.session, service_name, claims)
            values = self._release_values(current)
            configuration = policy.render_configuration(current.session, service_name, values)
            sealed = _seal_configuration(configuration, request.public_key, request.nonce)
        except (AttestationError, SecretError, PolicyError) as error:
            reason = error.diagnostics()
            self._finish_attestation(nonce, expires, AuditRecord(
                action="release", client=who, session=request.config_id, outcome="refused",
                reason=reason, hash_before=session_hash, hash_after=session_hash,
            ))
            log.warning("rejected attestation for %s: %s", request.config_id, reason)
            raise refuse(HTTPStatus.FORBIDDEN, reason) from error

        notes = list(warnings)
        if claims.evidence_type == SIMULATION:
            notes.insert(0, "insecure: simulation evidence, nothing vouches for the measurement")
        problem = self._finish_attestation(nonce, expires, AuditRecord(
            action="release", client=who, session=request.config_id, outcome="ok",
            reason="; ".join(notes), hash_before=session_hash, hash_after=session_hash,
        ))
        if problem is not None:
            log.warning("rejected attestation for %s: %s", request.config_id, problem)
            raise refuse(HTTPStatus.FORBIDDEN, problem)
        if claims.evidence_type == SIMULATION:
            log.warning(
                "INSECURE release of %s to simulation evidence (measurement %s): no hardware"
                " vouches for it", request.config_id, claims.measurement,
            )
        for note in warnings:
            log.warning("release of %s: %s", request.config_id, note)
        return sealed

    def _release_values(self, current: StoredSession) -> dict[str, Any]:
        """The stored values, with imported secrets read again so a withdrawn export applies."""
        values = dict(current.values)
        for definition in current.session.secrets:
            if definition.import_from is not None:
                values[definition.name] = self._imported(
                    current.name, definition.import_from.session, definition.import_from.secret
                )
        return values


@dataclass(frozen=True)
class AttestRequest:
    config_id: str
    nonce: bytes
    public_key: bytes
    evidence_type: str
    evidence: bytes


def _parse_attest_request(body: Any) -> AttestRequest:
    def bad(reason: str) -> CasRejected:
        return refuse(HTTPStatus.BAD_REQUEST, f"invalid attestation request: {reason}")

    if not isinstance(body, dict):
        raise bad("expected a JSON object")
    unknown = sorted(set(body) - {"config_id", "nonce", "public_key", "evidence"})
    if unknown:
        raise bad(f"unknown fields {', '.join(map(repr, unknown))}")
    config_id, evidence = body.get("config_id"), body.get("evidence")
    if not isinstance(config_id, str) or "/" not in config_id or len(config_id) > 1024:
        raise bad("config_id must be 'SESSION/SERVICE'")
    nonce = _hex_field(body, "nonce", (1, MAX_NONCE_BYTES), bad)
    public_key = _hex_field(body, "public_key", (32, 32), bad)
    if not isinstance(evidence, dict) or set(evidence) != {"type", "data"}:
        raise bad("evidence must be an object with 'type' and 'data'")
    if not isinstance(evidence["type"], str) or not isinstance(evidence["data"], str):
        raise bad("evidence type and data must be strings")
    try:
        data = base64.b64decode(evidence["data"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad("evidence data is not base64") from error
    return AttestRequest(config_id, nonce, public_key, evidence["type"], data)


def _hex_field(
    body: Mapping[str, Any], name: str, size: tuple[int, int], bad: Callable[[str], CasRejected]
) -> bytes:
    """Return the bytes of a hex field whose length lies in ``size`` (inclusive bounds)."""
    low, high = size
    expected = f"{low} bytes" if low == high else f"{low} to {high} bytes"
    value = body.get(name)
    if not isinstance(value, str):
        raise bad(f"{name} must be a hex string")
    if len(value) > 2 * high:
        raise bad(f"{name} must be {expected}, got {len(value)} hex digits")
    try:
        data = bytes.fromhex(value)
    except ValueError as error:
        raise bad(f"{name} is not hex") from error
    if not low <= len(data) <= high:
        raise bad(f"{name} must be {expected}, got {len(data)}")
    return data


def _seal_configuration(
    configuration: Mapping[str, Any], launcher_public: bytes, challenge_nonce: bytes
) -> dict[str, Any]:
    private, public = crypto.x25519_generate()
    try:
        shared = crypto.x25519_exchange(private, launcher_public)
    except ValueError as error:
        raise AttestationError(f"unusable launcher public key: {error}") from error
    key = crypto.hkdf_sha256(shared, salt=challenge_nonce, info=CONFIG_INFO)
    nonce = os.urandom(12)
    plaintext = json.dumps(configuration, sort_keys=True).encode()
    ciphertext = crypto.aes_gcm_encrypt(key, nonce, plaintext, b"")
    return {
        "cas_public_key": public.hex(),
        "nonce": nonce.hex(),
        "ciphertext": base64.b64encode(ciphertext).decode("ascii"),
    }
