"""Evidence verification: one entry point over a registry of verifiers.

A verifier is a pure function of (evidence bytes, collateral, time): it returns
:class:`~enclavify.attest.claims.Claims` or raises :class:`~enclavify.errors.AttestationError`
with the specific reason. It never reads files, opens connections or looks at the clock, and
it decides nothing about policy: whether a measurement, debug mode or a TCB status is acceptable
is for :func:`enclavify.policy.check_claims`.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Protocol

from enclavify.attest import report_data as report_data_module
from enclavify.attest.claims import REPORT_DATA_SIZE, Claims
from enclavify.attest.collateral import Collateral
from enclavify.attest.dcap import SgxVerifier, TdxVerifier
from enclavify.attest.simulation import SimulationVerifier
from enclavify.attest.snp import SnpVerifier
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
            revoked or lacks the collateral it needs; the message says which.
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


register(SimulationVerifier())
register(SgxVerifier())
register(TdxVerifier())
register(SnpVerifier())
