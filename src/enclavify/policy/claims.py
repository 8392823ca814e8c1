"""Decide whether verified attestation claims satisfy a session's policy for one service.

The verifier in :mod:`enclavify.attest` establishes the facts in the evidence, and this
module decides whether they are good enough. The binding of the evidence to the CAS's nonce and the
launcher's key (the report data) is checked by the CAS, not here.
"""

from __future__ import annotations

from enclavify.attest.claims import SEV_SNP, SGX_DCAP, SIMULATION, TDX, Claims
from enclavify.errors import AttestationError
from enclavify.policy.model import Service, Session

# The measurement list of a service that each evidence type is matched against. Simulation
# evidence carries the launcher's own 32-byte measurement, which the converter writes into
# the mrenclave list.
MEASUREMENT_LIST = {
    SIMULATION: "mrenclave",
    SGX_DCAP: "mrenclave",
    TDX: "mrtd",
    SEV_SNP: "snp_measurement",
}

SIMULATION_TCB_STATUS = "Simulation"

# Tolerations each non-UpToDate TCB status needs; Revoked is never accepted.
TCB_TOLERATIONS: dict[str, tuple[str, ...]] = {
    "UpToDate": (),
    "SWHardeningNeeded": ("software-hardening-needed",),
    "ConfigurationNeeded": ("insecure-configuration",),
    "ConfigurationAndSWHardeningNeeded": ("insecure-configuration", "software-hardening-needed"),
    "OutOfDate": ("outdated-tcb",),
    "OutOfDateConfigurationNeeded": ("outdated-tcb", "insecure-configuration"),
}

# Intel advisories that a named toleration accepts without listing them in ignore_advisories.
# INTEL-SA-00161 (L1 Terminal Fault) and INTEL-SA-00233 (Microarchitectural Data Sampling)
# are only fully mitigated with hyper-threading off. INTEL-SA-00219 concerns SGX on
# processors with integrated graphics, and INTEL-SA-00657 is the AEPIC leak.
# NOTE: this table covers the advisories these tolerations are known for; later advisories
# about the same weaknesses must be listed in ignore_advisories.
ADVISORY_TOLERATIONS: dict[str, str] = {
    "INTEL-SA-00161": "hyperthreading",
    "INTEL-SA-00233": "hyperthreading",
    "INTEL-SA-00219": "insecure-igpu",
    "INTEL-SA-00657": "aepic-leak",
}


def check_claims(session: Session, service: str, claims: Claims) -> list[str]:
    """Check ``claims`` against the policy of ``service`` in ``session``.

    Returns the warnings about accepted weaknesses (simulation evidence, debug mode, a TCB
    status or advisories tolerated). The caller logs each at WARNING, every time, so this
    function does not log them itself.

    Raises:
        AttestationError: the claims do not satisfy the policy. The message is the reason,
            with the expected and actual values, and contains no secrets.
    """
    definition = session.service(service)
    if definition is None:
        raise AttestationError(f"session {session.name!r} has no service {service!r}")
    subject = f"service {service!r} of session {session.name!r}"
    policy = session.attestation
    tolerated = set(policy.tolerate)
    warnings: list[str] = []

    # 1. The kind of evidence.
    if claims.evidence_type not in MEASUREMENT_LIST:
        raise AttestationError(f"unknown evidence type {claims.evidence_type!r}")
    if claims.evidence_type == SIMULATION:
        if not policy.accepts_simulation:
            raise AttestationError(
                f"simulation evidence is not accepted for {subject}: security.attestation.mode "
                f"is {policy.mode!r}; it must be 'simulation' to accept it (insecure)"
            )
        warnings.append(f"insecure: simulation evidence accepted for {subject}")

    # 2. The measurement.
    _check_measurement(definition, claims, subject)

    # 3. Debug mode.
    if claims.debug:
        if "debug-mode" not in tolerated:
            raise AttestationError(
                f"{claims.evidence_type} evidence for {subject} comes from a debug-mode TEE, "
                "whose memory the host can read; the session does not tolerate debug-mode"
            )
        warnings.append(f"insecure: debug-mode TEE accepted for {subject}")

    # 4. The platform's TCB status.
    _check_tcb(claims, subject, tolerated, warnings)

    # 5. Security advisories that apply to the platform.
    _check_advisories(claims, subject, session, warnings)

    return warnings


def _check_measurement(definition: Service, claims: Claims, subject: str) -> None:
    list_name = MEASUREMENT_LIST[claims.evidence_type]
    accepted: tuple[str, ...] = getattr(definition.attestation, list_name)
    actual = claims.measurement.lower()
    if not accepted:
        raise AttestationError(
            f"{subject} lists no {list_name} measurements, so {claims.evidence_type} "
            "evidence cannot match"
        )
    if actual not in accepted:
        raise AttestationError(
            f"{claims.evidence_type} measurement {actual} of {subject} is not in its "
            f"{list_name} list {list(accepted)}"
        )
    if claims.evidence_type == SGX_DCAP and definition.attestation.mrsigner:
        signer = str(claims.details.get("mrsigner", "")).lower()
        if signer not in definition.attestation.mrsigner:
            raise AttestationError(
                f"SGX MRSIGNER {signer or '(missing)'} of {subject} is not in its mrsigner "
                f"list {list(definition.attestation.mrsigner)}"
            )


def _check_tcb(claims: Claims, subject: str, tolerated: set[str], warnings: list[str]) -> None:
    status = claims.tcb_status
    if claims.evidence_type == SIMULATION:
        if status != SIMULATION_TCB_STATUS:
            raise AttestationError(
                f"simulation evidence for {subject} reports TCB status {status!r}, "
                f"expected {SIMULATION_TCB_STATUS!r}"
            )
        return
    if status == "Revoked":
        raise AttestationError(
            f"the platform of {subject} has TCB status 'Revoked', which no session can accept"
        )
    needed = TCB_TOLERATIONS.get(status)
    if needed is None:
        raise AttestationError(f"unknown TCB status {status!r} for {subject}")
    missing = [name for name in needed if name not in tolerated]
    if missing:
        raise AttestationError(
            f"the platform of {subject} has TCB status {status!r}, which needs "
            f"tolerate: [{', '.join(needed)}]; missing {', '.join(missing)}"
        )
    if needed:
        warnings.append(f"insecure: TCB status {status} tolerated for {subject}")


def _check_advisories(claims: Claims, subject: str, session: Session, warnings: list[str]) -> None:
    if not claims.advisories:
        return
    policy = session.attestation
    if policy.ignore_all_advisories:
        warnings.append(
            f"insecure: all advisories ignored for {subject}: {', '.join(claims.advisories)}"
        )
        return
    not_ignored = [
        advisory
        for advisory in claims.advisories
        if advisory not in policy.ignore_advisories
        and ADVISORY_TOLERATIONS.get(advisory) not in policy.tolerate
    ]
    if not_ignored:
        raise AttestationError(
            f"the platform of {subject} is affected by {', '.join(not_ignored)}, which the "
            "session does not list in ignore_advisories"
        )
    warnings.append(f"insecure: advisories accepted for {subject}: {', '.join(claims.advisories)}")
