from __future__ import annotations

from typing import Any

import pytest

from enclavify.attest.claims import Claims
from enclavify.errors import AttestationError
from enclavify.policy import Session, check_claims, parse_session

SGX = "aa" * 32
SIGNER = "bb" * 32
TDX = "cc" * 48
SNP = "dd" * 48


def _session(
    mode: str = "hardware", tolerate: tuple[str, ...] = (), ignore: Any = (), signer: bool = False
) -> Session:
    attestation = f"{{mrenclave: ['{SGX}'], mrtd: ['{TDX}'], snp_measurement: ['{SNP}']"
    if signer:
        attestation += f", mrsigner: ['{SIGNER}']"
    attestation += "}"
    ignore_text = repr(ignore) if isinstance(ignore, str) else list(ignore)
    return parse_session(
        f"""
name: ns/app
services:
  - name: svc
    command: /bin/app
    attestation: {attestation}
security:
  attestation:
    mode: {mode}
    tolerate: {list(tolerate)}
    ignore_advisories: {ignore_text}
"""
    )


def _claims(
    evidence_type: str = "sgx-dcap",
    measurement: str = SGX,
    *,
    debug: bool = False,
    tcb: str = "UpToDate",
    advisories: tuple[str, ...] = (),
    details: dict[str, Any] | None = None,
) -> Claims:
    return Claims(
        evidence_type=evidence_type,
        measurement=measurement,
        report_data=b"\0" * 64,
        debug=debug,
        tcb_status=tcb,
        advisories=advisories,
        details={"mrsigner": SIGNER} if details is None else details,
    )


def _refused(session: Session, claims: Claims, *words: str) -> None:
    with pytest.raises(AttestationError) as info:
        check_claims(session, "svc", claims)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("evidence_type", "measurement"),
    [("sgx-dcap", SGX), ("tdx", TDX), ("sev-snp", SNP), ("sgx-dcap", SGX.upper())],
)
def test_hardware_evidence_with_listed_measurement(evidence_type: str, measurement: str) -> None:
    assert check_claims(_session(), "svc", _claims(evidence_type, measurement)) == []


@pytest.mark.parametrize(
    ("evidence_type", "measurement", "list_name"),
    [
        ("sgx-dcap", "ee" * 32, "mrenclave"),
        ("tdx", "ee" * 48, "mrtd"),
        ("sev-snp", TDX, "snp_measurement"),
        ("tdx", SGX, "mrtd"),
    ],
)
def test_unlisted_measurement_is_refused(
    evidence_type: str, measurement: str, list_name: str
) -> None:
    _refused(_session(), _claims(evidence_type, measurement), measurement, list_name, "not in")


def test_service_without_list_for_tee_is_refused() -> None:
    session = parse_session(
        f"name: x\nservices:\n  - {{name: svc, command: a, mrenclaves: ['{SGX}']}}\n"
    )
    _refused(session, _claims("tdx", TDX), "no mrtd measurements")


def test_simulation_needs_explicit_mode() -> None:
    _refused(
        _session(),
        _claims("simulation", tcb="Simulation"),
        "simulation evidence is not accepted",
        "'hardware'",
    )
    for mode in ("simulation", "none"):
        warnings = check_claims(_session(mode), "svc", _claims("simulation", tcb="Simulation"))
        assert warnings == [
            "insecure: simulation evidence accepted for service 'svc' of session 'ns/app'"
        ]


def test_simulation_with_hardware_status_is_refused() -> None:
    _refused(_session("simulation"), _claims("simulation", tcb="UpToDate"), "expected 'Simulation'")


def test_simulation_mode_still_accepts_hardware() -> None:
    assert check_claims(_session("simulation"), "svc", _claims()) == []


def test_hardware_claiming_simulation_status_is_refused() -> None:
    _refused(_session("simulation"), _claims(tcb="Simulation"), "unknown TCB status")


def test_debug_needs_toleration() -> None:
    _refused(_session(), _claims(debug=True), "debug-mode")
    warnings = check_claims(_session(tolerate=("debug-mode",)), "svc", _claims(debug=True))
    assert warnings == ["insecure: debug-mode TEE accepted for service 'svc' of session 'ns/app'"]


TCB_MATRIX = [
    ("UpToDate", (), True),
    ("SWHardeningNeeded", (), False),
    ("SWHardeningNeeded", ("software-hardening-needed",), True),
    ("ConfigurationNeeded", ("software-hardening-needed",), False),
    ("ConfigurationNeeded", ("insecure-configuration",), True),
    ("ConfigurationAndSWHardeningNeeded", ("insecure-configuration",), False),
    ("ConfigurationAndSWHardeningNeeded", ("software-hardening-needed",), False),
    (
        "ConfigurationAndSWHardeningNeeded",
        ("insecure-configuration", "software-hardening-needed"),
        True,
    ),
    ("OutOfDate", (), False),
    ("OutOfDate", ("outdated-tcb",), True),
    ("OutOfDateConfigurationNeeded", ("outdated-tcb",), False),
    ("OutOfDateConfigurationNeeded", ("outdated-tcb", "insecure-configuration"), True),
    (
        "Revoked",
        ("outdated-tcb", "insecure-configuration", "software-hardening-needed", "debug-mode"),
        False,
    ),
    ("SomethingNew", ("outdated-tcb",), False),
]


@pytest.mark.parametrize(("status", "tolerate", "accepted"), TCB_MATRIX)
def test_tcb_status_matrix(status: str, tolerate: tuple[str, ...], accepted: bool) -> None:
    session = _session(tolerate=tolerate)
    if accepted:
        warnings = check_claims(session, "svc", _claims(tcb=status))
        assert (status == "UpToDate") == (warnings == [])
        if warnings:
            assert status in warnings[0]
    else:
        _refused(session, _claims(tcb=status), repr(status))


def test_advisories_must_be_ignored() -> None:
    claims = _claims(tcb="SWHardeningNeeded", advisories=("INTEL-SA-00615", "INTEL-SA-00828"))
    tolerate = ("software-hardening-needed",)
    _refused(_session(tolerate=tolerate), claims, "INTEL-SA-00615", "INTEL-SA-00828")
    _refused(_session(tolerate=tolerate, ignore=("INTEL-SA-00615",)), claims, "INTEL-SA-00828")
    warnings = check_claims(
        _session(tolerate=tolerate, ignore=("INTEL-SA-00615", "INTEL-SA-00828")), "svc", claims
    )
    assert any("INTEL-SA-00828" in w for w in warnings)
    # "*" is only allowed with debug-mode, and then ignores everything.
    warnings = check_claims(_session(tolerate=(*tolerate, "debug-mode"), ignore="*"), "svc", claims)
    assert any("all advisories ignored" in w for w in warnings)


@pytest.mark.parametrize(
    ("advisory", "toleration"),
    [
        ("INTEL-SA-00161", "hyperthreading"),
        ("INTEL-SA-00219", "insecure-igpu"),
        ("INTEL-SA-00657", "aepic-leak"),
    ],
)
def test_named_tolerations_cover_their_advisories(advisory: str, toleration: str) -> None:
    claims = _claims(advisories=(advisory,))
    _refused(_session(), claims, advisory)
    assert check_claims(_session(tolerate=(toleration,)), "svc", claims)


def test_mrsigner_is_checked_when_listed() -> None:
    session = _session(signer=True)
    assert check_claims(session, "svc", _claims()) == []
    _refused(session, _claims(details={"mrsigner": "ef" * 32}), "MRSIGNER", "ef" * 32)
    _refused(session, _claims(details={}), "(missing)")


def test_unknown_service_and_type() -> None:
    with pytest.raises(AttestationError) as info:
        check_claims(_session(), "other", _claims())
    assert "no service 'other'" in str(info.value)
    _refused(_session(), _claims("magic"), "unknown evidence type")
