"""The verify_evidence registry, simulation evidence and the report data binding."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

from enclavify.attest import report_data
from enclavify.attest.claims import Claims
from enclavify.attest.verify import check_report_data, verify_evidence
from enclavify.errors import AttestationError

NOW = datetime(2026, 1, 1, tzinfo=UTC)
MEASUREMENT = "ab" * 32


def simulation_evidence(**fields: object) -> bytes:
    document: dict[str, object] = {"measurement": MEASUREMENT, "report_data": "00" * 64}
    document.update(fields)
    return json.dumps({k: v for k, v in document.items() if v is not None}).encode()


def test_bind_is_sha512_of_nonce_and_key() -> None:
    nonce = bytes(range(32))
    key = b"\x09" * 32
    assert report_data.bind(nonce, key) == hashlib.sha512(nonce + key).digest()
    assert len(report_data.bind(nonce, key)) == 64


def test_bind_rejects_empty_inputs() -> None:
    with pytest.raises(ValueError):
        report_data.bind(b"", b"k")
    with pytest.raises(ValueError):
        report_data.bind(b"n", b"")


def test_simulation_evidence_becomes_claims() -> None:
    bound = report_data.bind(b"nonce", b"key")
    claims = verify_evidence("simulation", simulation_evidence(report_data=bound.hex()), now=NOW)
    assert claims.evidence_type == "simulation"
    assert claims.measurement == MEASUREMENT
    assert claims.report_data == bound
    assert claims.tcb_status == "Simulation"
    assert claims.debug is False
    assert claims.advisories == ()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (simulation_evidence(measurement=None), "lacks 'measurement'"),
        (simulation_evidence(report_data=None), "lacks 'report_data'"),
        (simulation_evidence(measurement="XY"), "measurement must be lower-case hex"),
        (simulation_evidence(measurement="ABCD"), "measurement must be lower-case hex"),
        (simulation_evidence(report_data="00" * 32), "must be 64 bytes, got 32"),
        (simulation_evidence(extra=1), "unknown fields: extra"),
    ],
)
def test_malformed_simulation_evidence_is_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(AttestationError, match=reason):
        verify_evidence("simulation", data, now=NOW)


def test_unknown_evidence_type_is_rejected() -> None:
    with pytest.raises(AttestationError, match="unknown evidence type 'quantum'"):
        verify_evidence("quantum", b"", now=NOW)


def test_naive_time_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_evidence("simulation", simulation_evidence(), now=datetime(2026, 1, 1))


def claims_with(report: bytes) -> Claims:
    return Claims(
        evidence_type="simulation",
        measurement=MEASUREMENT,
        report_data=report,
        debug=False,
        tcb_status="Simulation",
    )


def test_report_data_binding_accepts_matching_nonce_and_key() -> None:
    check_report_data(claims_with(report_data.bind(b"n" * 32, b"k" * 32)), b"n" * 32, b"k" * 32)


@pytest.mark.parametrize(
    ("nonce", "key"),
    [(b"m" * 32, b"k" * 32), (b"n" * 32, b"j" * 32), (b"n" * 31, b"k" * 32)],
    ids=["other-nonce", "other-key", "short-nonce"],
)
def test_report_data_for_other_exchange_is_rejected(nonce: bytes, key: bytes) -> None:
    claims = claims_with(report_data.bind(b"n" * 32, b"k" * 32))
    with pytest.raises(AttestationError, match="does not bind the challenge nonce"):
        check_report_data(claims, nonce, key)


def test_zero_report_data_is_rejected() -> None:
    with pytest.raises(AttestationError, match="does not bind"):
        check_report_data(claims_with(bytes(64)), b"n", b"k")
