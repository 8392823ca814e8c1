"""Racing updates and crash durability against real CAS processes."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from enclavify import crypto
from enclavify.cas import audit
from enclavify.cas.client import CasClient, Identity
from enclavify.cas.storage import Database
from enclavify.errors import CasError, CasRejected

from .conftest import CasProcess, app_yaml, namespace_yaml, start_cas, unique
from .test_release import _request_body

RACERS = 8


@pytest.fixture
def cas_pair(postgres_url: str, tmp_path: Path) -> Iterator[tuple[CasProcess, CasProcess]]:
    """Two CAS processes on one data directory (one CA, master key and head file) and one
    PostgreSQL database."""
    with start_cas(tmp_path / "cas", db=postgres_url) as first, \
            start_cas(tmp_path / "cas", db=postgres_url) as second:
        yield first, second


def _race(clients: list[CasClient], name: str, predecessor: str) -> tuple[list[str], list[int]]:
    """Send RACERS different updates naming the same predecessor at once."""
    barrier = threading.Barrier(RACERS)

    def update(i: int) -> str | int:
        text = namespace_yaml(name).replace("'0.3'", f"'1.{i}'") + f"predecessor: {predecessor}\n"
        barrier.wait()
        try:
            return clients[i % len(clients)].update_session(text)
        except CasRejected as error:
            return error.status

    with ThreadPoolExecutor(RACERS) as pool:
        results = list(pool.map(update, range(RACERS)))
    return [r for r in results if isinstance(r, str)], [r for r in results if isinstance(r, int)]


def _check_one_winner(client: CasClient, name: str, predecessor: str, rounds: int = 5) -> None:
    for _ in range(rounds):
        winners, refused = _race([client], name, predecessor)
        assert len(winners) == 1, f"{len(winners)} updates won with the same predecessor"
        assert refused == [409] * (RACERS - 1)
        assert client.get_session(name)["hash"] == winners[0]
        history = client.session_history(name)
        assert history[-1]["predecessor"] == predecessor
        predecessor = winners[0]
    assert len(client.session_history(name)) == rounds + 1


def test_racing_updates_sqlite(cas: CasProcess, identities: dict[str, Identity]) -> None:
    client = cas.client(identities["alice"])
    name = unique("race")
    digest = client.create_session(namespace_yaml(name))
    _check_one_winner(client, name, digest)


@pytest.mark.postgres
def test_racing_updates_postgres(
    postgres_url: str, tmp_path: Path, identities: dict[str, Identity]
) -> None:
    with start_cas(tmp_path / "cas", db=postgres_url) as server:
        client = server.client(identities["alice"])
        name = unique("race")
        digest = client.create_session(namespace_yaml(name))
        _check_one_winner(client, name, digest)


@pytest.mark.postgres
def test_racing_updates_across_two_processes(
    cas_pair: tuple[CasProcess, CasProcess], postgres_url: str, tmp_path: Path,
    identities: dict[str, Identity],
) -> None:
    clients = [server.client(identities["alice"]) for server in cas_pair]
    name = unique("race2")
    predecessor = clients[0].create_session(namespace_yaml(name))
    assert clients[1].get_session(name)["hash"] == predecessor
    for _ in range(5):
        winners, refused = _race(clients, name, predecessor)
        assert len(winners) == 1, f"{len(winners)} updates won across two CAS processes"
        assert refused == [409] * (RACERS - 1)
        assert clients[0].get_session(name)["hash"] == winners[0]
        assert clients[1].get_session(name)["hash"] == winners[0]
        predecessor = winners[0]
    database = Database.open(postgres_url)
    try:
        head = audit.HeadFile(tmp_path / "cas" / audit.HEAD_FILE)
        result = audit.verify_chain(database, head)
    finally:
        database.close()
    assert result.ok, result.problems


@pytest.mark.slow
def test_sigkill_loses_no_write_sqlite(tmp_path: Path, identities: dict[str, Identity]) -> None:
    _crash_during_writes(tmp_path / "cas", None, identities["alice"])


@pytest.mark.slow
@pytest.mark.postgres
def test_sigkill_loses_no_write_postgres(
    postgres_url: str, tmp_path: Path, identities: dict[str, Identity]
) -> None:
    _crash_during_writes(tmp_path / "cas", postgres_url, identities["alice"])


def _crash_during_writes(data: Path, db: str | None, identity: Identity) -> None:
    """SIGKILL the CAS at random moments under four writers; check every acknowledged write."""
    acknowledged: dict[str, str] = {}
    lock = threading.Lock()
    rng = random.Random(20261204)

    for round_number in range(4):
        server = start_cas(data, db=db)
        client = server.client(identity, attempts=1)
        stop = threading.Event()

        def writer(worker: int, client: CasClient = client,
                   stop: threading.Event = stop, round_number: int = round_number) -> None:
            n = 0
            while not stop.is_set():
                name = f"crash{round_number}w{worker}n{n}"
                n += 1
                try:
                    digest = client.create_session(namespace_yaml(name))
                except CasError:
                    continue
                with lock:
                    acknowledged[name] = digest

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.3, 1.2))
        server.stop(signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join()

    assert len(acknowledged) > 20, "too few writes were acknowledged to test anything"
    with start_cas(data, db=db) as server:
        client = server.client(identity)
        for name, digest in acknowledged.items():
            assert client.get_session(name)["hash"] == digest, f"acknowledged {name} was lost"
    database = Database.open(db or str(data / "cas.db"))
    try:
        result = audit.verify_chain(database, audit.HeadFile(data / audit.HEAD_FILE))
    finally:
        database.close()
    assert result.ok, result.problems
    assert result.records >= len(acknowledged)


@pytest.mark.postgres
def test_nonce_shared_across_processes(
    cas_pair: tuple[CasProcess, CasProcess], identities: dict[str, Identity]
) -> None:
    first, second = cas_pair
    name = unique("pair")
    first.client(identities["alice"]).create_session(app_yaml(name))
    nonce = bytes.fromhex(
        first.client(None)._request("POST", "/v1/attest/challenge", b"{}")["nonce"]
    )
    _, public = crypto.x25519_generate()
    body = json.dumps(_request_body(f"{name}/api", nonce, public)).encode()
    answer = second.client(None)._request("POST", "/v1/attest", body)
    assert set(answer) == {"cas_public_key", "nonce", "ciphertext"}
    with pytest.raises(CasRejected, match="nonce already used"):
        first.client(None)._request("POST", "/v1/attest", body)
