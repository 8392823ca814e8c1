"""Evidence verification: one entry point over a registry of verifiers.

A verifier is a pure function of (evidence bytes, collateral, time): it returns
:class:`~enclavify.attest.claims.Claims` or raises :class:`~enclavify.errors.AttestationError`
with the specific reason. It never reads files, opens connections or looks at the clock, and
it decides nothing about policy: whether a measurement, debug mode or a TCB status is acceptable
is for :func:`enclavify.policy.check_claims`.
"""

from __future__ import annotations

import hmac
import json
from datetime import datetime
from typing import Protocol

from enclavify.attest import report_data as report_data_module
from enclavify.attest.claims import (
    REPORT_DATA_SIZE,
    SEV_SNP,
    SGX_DCAP,
    SIMULATION,
    TDX,
    Claims,
)
from enclavify.attest.collateral import Collateral
from enclavify.attest.dcap import (
    HEADER_SIZE,
    TEE_TYPE_SGX,
    TEE_TYPE_TDX,
    SgxVerifier,
    TdxVerifier,
    quote_header,
)
from enclavify.attest.simulation import SimulationVerifier
from enclavify.attest.snp import REPORT_SIZE, SnpVerifier
from enclavify.errors import AttestationError


class Verifier(Protocol):
    """Turns one type of evidence into claims or raises AttestationError."""

    evidence_type: str

    def verify(self, data: bytes, *, now: datetime, collateral: Collateral | None) -> Claims: ...


_VERIFIERS: dict[str, Verifier] = {}


def register(verifier: Verifier) -> None:
    """Make ``verifier`` the one used for its evidence type, replacing any earlier one."""
    _VERIFIERS[verifier.evidence_type] = verifier


def verifiers() -> dict[str, Verifier]:
    """Return the registered verifiers by evidence type."""
    return dict(_VERIFIERS)


def verify_evidence(
    evidence_type: str,
    data: bytes,
    *,
    now: datetime,
    collateral: Collateral | None = None,
) -> Claims:
    """Verify ``data`` as evidence of ``evidence_type`` at time ``now``.

    ``now`` must be timezone-aware: certificate, CRL and TCB validity windows are compared
    against it.

    Raises:
        AttestationError: the type is unknown, or the evidence is malformed, forged, expired,
            revoked or lacks the collateral it needs; the message names the reason.
    """
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    verifier = _VERIFIERS.get(evidence_type)
    if verifier is None:
        known = ", ".join(sorted(_VERIFIERS))
        raise AttestationError(f"unknown evidence type {evidence_type!r} (known: {known})")
    claims = verifier.verify(data, now=now, collateral=collateral)
    if len(claims.report_data) != REPORT_DATA_SIZE:
        raise AttestationError(
            f"{evidence_type} evidence has {len(claims.report_data)} bytes of report data,"
            f" expected {REPORT_DATA_SIZE}"
        )
    return claims


def check_report_data(claims: Claims, nonce: bytes, public_key: bytes) -> None:
    """Check that the claims' report data is SHA-512(nonce || public_key).

    Raises:
        AttestationError: if it binds a different nonce or key, so the evidence was produced
            for another exchange (a replay) or another key.
    """
    expected = report_data_module.bind(nonce, public_key)
    if not hmac.compare_digest(expected, claims.report_data):
        raise AttestationError("report data does not bind the challenge nonce and public key")


def detect_evidence_type(data: bytes) -> str:
    """Guess the evidence type from its form.

    JSON with ``outblob`` is configfs-tsm SEV-SNP evidence and JSON with ``measurement`` is
    simulation evidence; 1184 bytes starting with a report version from 2 to 255 is an SEV-SNP
    report; otherwise the quote header's version and TEE type tell SGX from TDX.

    Raises:
        AttestationError: if the form matches none of these.
    """
    if data.lstrip().startswith(b"{"):
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise AttestationError(f"evidence looks like JSON but is not valid: {error}") from error
        if isinstance(document, dict) and "outblob" in document:
            return SEV_SNP
        if isinstance(document, dict) and "measurement" in document:
            return SIMULATION
        raise AttestationError("JSON evidence is neither configfs-tsm nor simulation evidence")
    # A quote's first 32 bits hold its version and key type (0x20003 for SGX version 3), while
    # an SEV-SNP report starts with a small version number.
    if len(data) == REPORT_SIZE and 2 <= int.from_bytes(data[:4], "little") <= 0xFF:
        return SEV_SNP
    if len(data) > HEADER_SIZE:
        version, tee_type = quote_header(data)
        if tee_type == TEE_TYPE_SGX and version in (3, 4, 5):
            return SGX_DCAP
        if tee_type == TEE_TYPE_TDX and version in (4, 5):
            return TDX
    raise AttestationError("cannot tell the evidence type; name it explicitly")


register(SimulationVerifier())
register(SgxVerifier())
register(TdxVerifier())
register(SnpVerifier())
