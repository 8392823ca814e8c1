"""What a verifier establishes from a piece of evidence.

Verifiers turn evidence into :class:`Claims` or raise :class:`enclavify.errors.AttestationError`;
whether the claims are good enough for a service is decided by the session's policy, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Evidence types, as named on the wire and in sessions.
SIMULATION = "simulation"
SGX_DCAP = "sgx-dcap"
TDX = "tdx"
SEV_SNP = "sev-snp"
EVIDENCE_TYPES = (SIMULATION, SGX_DCAP, TDX, SEV_SNP)

REPORT_DATA_SIZE = 64


@dataclass(frozen=True)
class Claims:
    """Verified facts about one launcher instance.

    ``measurement`` is the hex identity the session's measurement list is matched against:
    MRENCLAVE for SGX, MRTD for TDX, MEASUREMENT for SEV-SNP and the launcher's own
    measurement for simulation. ``tcb_status`` uses Intel's names (``UpToDate``,
    ``SWHardeningNeeded``, ``ConfigurationNeeded``, ``ConfigurationAndSWHardeningNeeded``,
    ``OutOfDate``, ``OutOfDateConfigurationNeeded``, ``Revoked``); SEV-SNP maps onto them and
    simulation reports ``Simulation``. ``details`` holds the type-specific fields (MRSIGNER,
    ISV product id and SVN, RTMRs, host data, guest policy, TCB versions).
    """

    evidence_type: str
    measurement: str
    report_data: bytes
    debug: bool
    tcb_status: str
    advisories: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)


def claims_to_dict(claims: Claims) -> dict[str, Any]:
    """Return the claims as JSON-ready values, with the report data in hex."""
    return {
        "evidence_type": claims.evidence_type,
        "measurement": claims.measurement,
        "report_data": claims.report_data.hex(),
        "debug": claims.debug,
        "tcb_status": claims.tcb_status,
        "advisories": list(claims.advisories),
        "details": dict(claims.details),
    }
