"""Verified claims from real and test-chain evidence, judged by the session policy."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from enclavify.attest import snp
from enclavify.attest.claims import Claims
from enclavify.attest.collateral import Collateral
from enclavify.attest.verify import verify_evidence
from enclavify.errors import AttestationError
from enclavify.policy import Session, check_claims, parse_session

from .samples import sample
from .snp_chain import NOW, FakeAmdChain, certificate_table, configfs_json, der, make_report

SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SNP_MEASUREMENT = "7699e6ac12ccdfd1dfac70e649ce1f046cb2afbb003438f4" + (
    "cdddfe2ccbe182fa5ffbe8dcdb930454324e10c52c788980"
)
TEST_CHAIN_MEASUREMENT = "22" * 48


def session(
    *,
    mrenclave: str = SGX_MRENCLAVE,
    snp_measurement: str = SNP_MEASUREMENT,
    tolerate: str = "[]",
    ignore: str = "[]",
) -> Session:
    return parse_session(
        f"""
name: ns/app
services:
  - name: svc
    command: /bin/app
    attestation:
      mrenclave: ['{mrenclave}']
      snp_measurement: ['{snp_measurement}', '{TEST_CHAIN_MEASUREMENT}']
security:
  attestation:
    mode: hardware
    tolerate: {tolerate}
    ignore_advisories: {ignore}
"""
    )


def sgx_claims() -> Claims:
    pytest.importorskip("dcap_qvl", reason="SGX verification needs the dcap-qvl package")
    quote = sample("dcap-qvl/sgx_quote").read_bytes()
    collateral = Collateral.from_dcap_json(
        sample("dcap-qvl/sgx_quote_collateral.json").read_bytes()
    )
    return verify_evidence(
        "sgx-dcap", quote, now=datetime(2025, 7, 1, tzinfo=UTC), collateral=collateral
    )


def test_sgx_status_not_tolerated_is_rejected() -> None:
    with pytest.raises(AttestationError, match="ConfigurationAndSWHardeningNeeded"):
        check_claims(session(), "svc", sgx_claims())


def test_sgx_advisories_not_ignored_are_rejected() -> None:
    tolerate = "[insecure-configuration, software-hardening-needed]"
    with pytest.raises(AttestationError, match="INTEL-SA-00289, INTEL-SA-00615"):
        check_claims(session(tolerate=tolerate), "svc", sgx_claims())


def test_sgx_fully_tolerated_is_accepted_with_warnings() -> None:
    tolerate = "[insecure-configuration, software-hardening-needed]"
    ignore = "[INTEL-SA-00289, INTEL-SA-00615]"
    warnings = check_claims(session(tolerate=tolerate, ignore=ignore), "svc", sgx_claims())
    assert any("ConfigurationAndSWHardeningNeeded" in warning for warning in warnings)
    assert any("INTEL-SA-00289" in warning for warning in warnings)


def test_sgx_unknown_measurement_is_rejected() -> None:
    tolerate = "[insecure-configuration, software-hardening-needed]"
    ignore = "[INTEL-SA-00289, INTEL-SA-00615]"
    other = session(mrenclave="ab" * 32, tolerate=tolerate, ignore=ignore)
    with pytest.raises(
        AttestationError, match=f"measurement {SGX_MRENCLAVE} .* not in its mrenclave list"
    ):
        check_claims(other, "svc", sgx_claims())


def test_snp_sample_is_accepted() -> None:
    data = sample("veraison/sevsnp-tsm-report.json").read_bytes()
    claims = verify_evidence("sev-snp", data, now=datetime(2026, 1, 1, tzinfo=UTC))
    assert check_claims(session(), "svc", claims) == []


def test_snp_sample_unknown_measurement_is_rejected() -> None:
    data = sample("veraison/sevsnp-tsm-report.json").read_bytes()
    claims = verify_evidence("sev-snp", data, now=datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(AttestationError, match="not in its snp_measurement list"):
        check_claims(session(snp_measurement="ef" * 48), "svc", claims)


def debug_guest_claims() -> Claims:
    chain = FakeAmdChain()
    key, vcek = chain.endorsement_key()
    report = make_report(key, policy=0x30000 | snp.POLICY_DEBUG)
    table = certificate_table({snp.GUID_VCEK: der(vcek), snp.GUID_ASK: der(chain.ask)})
    collateral = Collateral(certificates=(der(chain.ark),))
    return verify_evidence("sev-snp", configfs_json(report, table), now=NOW, collateral=collateral)


def test_snp_debug_guest_not_tolerated_is_rejected() -> None:
    with pytest.raises(AttestationError, match="debug-mode"):
        check_claims(session(), "svc", debug_guest_claims())


def test_snp_debug_guest_tolerated_warns() -> None:
    warnings = check_claims(session(tolerate="[debug-mode]"), "svc", debug_guest_claims())
    assert any("debug-mode" in warning for warning in warnings)
