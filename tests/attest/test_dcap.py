"""SGX DCAP and TDX quotes from real hardware, verified with their published collateral."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest

from enclavify.attest.collateral import Collateral
from enclavify.attest.verify import verify_evidence
from enclavify.errors import AttestationError

from .samples import sample

pytest.importorskip("dcap_qvl", reason="SGX and TDX verification needs the dcap-qvl package")

# Inside the TCB info window of both samples (2025-06-19 to 2025-07-19).
INSIDE = datetime(2025, 7, 1, tzinfo=UTC)

# Offsets inside the quote: the 48-byte header, then the 384-byte SGX report body; the TD
# report 1.0 body is 584 bytes, followed by a u32 signature length and the ECDSA signature.
HEADER = 48
SGX_BODY = 384
TD10_BODY = 584


def load(name: str) -> tuple[bytes, Collateral]:
    quote = sample(f"dcap-qvl/{name}").read_bytes()
    collateral_path = sample(f"dcap-qvl/{name}_collateral.json")
    return quote, Collateral.from_dcap_json(collateral_path.read_bytes())


def flipped(data: bytes, offset: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 0x01
    return bytes(changed)


def test_sgx_quote_verifies_with_status_and_advisories() -> None:
    quote, collateral = load("sgx_quote")
    claims = verify_evidence("sgx-dcap", quote, now=INSIDE, collateral=collateral)
    assert claims.evidence_type == "sgx-dcap"
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert claims.debug is False


def test_sgx_claims_match_independent_parse() -> None:
    quote, collateral = load("sgx_quote")
    claims = verify_evidence("sgx-dcap", quote, now=INSIDE, collateral=collateral)
    body = quote[HEADER : HEADER + SGX_BODY]
    assert struct.unpack_from("<H", quote)[0] == 3
    assert claims.measurement == body[64:96].hex()
    assert claims.measurement == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert claims.details["mrsigner"] == body[128:160].hex()
    assert claims.details["mrsigner"] == (
        "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    )
    assert claims.details["isv_prod_id"] == struct.unpack_from("<H", body, 256)[0] == 0
    assert claims.details["isv_svn"] == struct.unpack_from("<H", body, 258)[0] == 0
    assert claims.report_data == body[320:384]
    assert claims.report_data.startswith(b"Hello, world!")
    assert claims.debug == bool(body[48] & 0x02)


def test_tdx_v4_quote_verifies_up_to_date() -> None:
    quote, collateral = load("tdx_quote")
    claims = verify_evidence("tdx", quote, now=INSIDE, collateral=collateral)
    assert claims.tcb_status == "UpToDate"
    assert claims.advisories == ()
    assert claims.debug is False


def test_tdx_claims_match_independent_parse() -> None:
    quote, collateral = load("tdx_quote")
    claims = verify_evidence("tdx", quote, now=INSIDE, collateral=collateral)
    body = quote[HEADER : HEADER + TD10_BODY]
    assert struct.unpack_from("<HHI", quote) == (4, 2, 0x81)
    mrtd = body[136:184].hex()
    assert claims.measurement == mrtd
    assert claims.details["mrtd"] == mrtd
    assert mrtd.startswith("91eb2b44d141d4ece09f0c75c2c53d247a3c68ed")
    rtmrs = [body[328 + 48 * index : 376 + 48 * index].hex() for index in range(4)]
    assert claims.details["rtmrs"] == rtmrs
    assert claims.details["mrseam"] == body[16:64].hex()
    assert claims.report_data == body[520:584]
    assert claims.debug == bool(body[120] & 0x01)


def test_tdx_v5_without_tcb_level_rejected() -> None:
    # This platform's CPU SVN is below every level its TCB info lists, so no status exists.
    quote, collateral = load("tdx_quote_outdated")
    assert struct.unpack_from("<HHI", quote) == (5, 2, 0x81)
    with pytest.raises(AttestationError, match="No matching TCB level found"):
        verify_evidence("tdx", quote, now=datetime(2026, 3, 1, tzinfo=UTC), collateral=collateral)


@pytest.mark.parametrize(
    ("name", "evidence_type", "offset"),
    [
        ("sgx_quote", "sgx-dcap", HEADER + 64),  # MRENCLAVE
        ("sgx_quote", "sgx-dcap", HEADER + 320),  # report data
        ("sgx_quote", "sgx-dcap", HEADER + SGX_BODY + 4 + 10),  # quote signature
        ("tdx_quote", "tdx", HEADER + 136),  # MRTD
        ("tdx_quote", "tdx", HEADER + TD10_BODY + 4 + 40),  # quote signature
    ],
    ids=["sgx-mrenclave", "sgx-report-data", "sgx-signature", "tdx-mrtd", "tdx-signature"],
)
def test_flipped_bit_is_rejected(name: str, evidence_type: str, offset: int) -> None:
    quote, collateral = load(name)
    with pytest.raises(AttestationError, match=r"quote rejected: .*signature"):
        verify_evidence(evidence_type, flipped(quote, offset), now=INSIDE, collateral=collateral)


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        (datetime(2025, 8, 1, tzinfo=UTC), "expired"),
        (datetime(2025, 6, 1, tzinfo=UTC), "in the future"),
    ],
    ids=["expired", "not-yet-valid"],
)
def test_collateral_outside_validity_is_rejected(now: datetime, reason: str) -> None:
    quote, collateral = load("sgx_quote")
    with pytest.raises(AttestationError, match=reason):
        verify_evidence("sgx-dcap", quote, now=now, collateral=collateral)


def test_collateral_of_other_platform_is_rejected() -> None:
    quote, _ = load("tdx_quote")
    _, other = load("tdx_quote_outdated")
    with pytest.raises(AttestationError, match="quote rejected"):
        verify_evidence("tdx", quote, now=INSIDE, collateral=other)


def test_quote_without_collateral_is_rejected() -> None:
    quote, _ = load("sgx_quote")
    with pytest.raises(AttestationError, match="need DCAP collateral"):
        verify_evidence("sgx-dcap", quote, now=INSIDE)


def test_quote_of_wrong_type_is_rejected() -> None:
    quote, collateral = load("sgx_quote")
    with pytest.raises(AttestationError, match="TEE type 0x0, expected 0x81"):
        verify_evidence("tdx", quote, now=INSIDE, collateral=collateral)


def test_truncated_quote_is_rejected() -> None:
    quote, collateral = load("sgx_quote")
    with pytest.raises(AttestationError, match="shorter than its 48-byte header"):
        verify_evidence("sgx-dcap", quote[:20], now=INSIDE, collateral=collateral)
    with pytest.raises(AttestationError, match="quote rejected"):
        verify_evidence("sgx-dcap", quote[:1000], now=INSIDE, collateral=collateral)


def test_incomplete_collateral_is_rejected() -> None:
    with pytest.raises(AttestationError, match=r"lacks .*tcb_info,"):
        Collateral.from_dcap_json(b'{"pck_crl_issuer_chain": ""}')
