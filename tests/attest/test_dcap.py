"""SGX DCAP and TDX quotes from real hardware, verified with their published collateral."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime

import pytest
from cryptography import x509

from enclavify.attest.collateral import Collateral
from enclavify.attest.verify import verify_evidence
from enclavify.errors import AttestationError

from .samples import sample

pytest.importorskip("dcap_qvl", reason="SGX and TDX verification needs the dcap-qvl package")

# Inside the TCB info window of both samples (2025-06-19 to 2025-07-19).
INSIDE = datetime(2025, 7, 1, tzinfo=UTC)

# Inside every validity window of the outdated sample's collateral: its TCB info runs from
# 2026-02-18T10:58:51Z to 2026-03-20T10:58:51Z, its QE identity and PCK CRL end at
# 2026-03-20T10:41:15Z and its root CA CRL at 2026-04-03.
OUTDATED_INSIDE = datetime(2026, 3, 1, tzinfo=UTC)

# Offsets inside the quote: the 48-byte header, then the 384-byte SGX report body; the TD
# report 1.0 body is 584 bytes, followed by a u32 signature length and the ECDSA signature.
# A version 5 quote puts a u16 body type (3 for TD report 1.5) and a u32 body size between the
# header and the 648-byte TD report 1.5 body, whose first 584 bytes are laid out as in 1.0.
HEADER = 48
SGX_BODY = 384
TD10_BODY = 584
V5_BODY = HEADER + 6
TD15_BODY = 648

# Intel's SGX extension in a PCK certificate, and the DER encoding of the OID prefix of its
# TCB entries: 1.2.840.113741.1.13.1.2.N is SGX TCB component N (1 to 16), N = 17 the PCE SVN.
SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
TCB_ENTRY_OID_PREFIX = bytes.fromhex("060b2a864886f84d010d0102")


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


def pck_tcb_from_v5_quote(quote: bytes) -> tuple[list[int], int]:
    """Read the SGX TCB components and PCE SVN of the PCK certificate inside a v5 TDX quote.

    Walks the quote by byte offsets. After the body come a u32 signature data length, the
    ECDSA signature (64 bytes), the attestation key (64) and certification data of type 6 (u16
    type, u32 size). That contains the QE report (384), its signature (64), u16-prefixed QE
    authentication data and nested certification data of type 5 with the PEM PCK chain.
    """
    body_type, body_size = struct.unpack_from("<HI", quote, HEADER)
    assert (body_type, body_size) == (3, TD15_BODY)
    offset = V5_BODY + TD15_BODY + 4 + 64 + 64
    outer_type, _outer_size = struct.unpack_from("<HI", quote, offset)
    assert outer_type == 6
    offset += 6 + 384 + 64
    (auth_size,) = struct.unpack_from("<H", quote, offset)
    offset += 2 + auth_size
    inner_type, inner_size = struct.unpack_from("<HI", quote, offset)
    assert inner_type == 5
    chain = quote[offset + 6 : offset + 6 + inner_size]
    leaf = x509.load_pem_x509_certificates(chain)[0]
    extension = leaf.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
    assert isinstance(extension, x509.UnrecognizedExtension)
    der = extension.value
    svns = {}
    for number in range(1, 18):
        # Each entry is SEQUENCE { OID prefix.N, INTEGER }. Every SVN here fits one byte.
        entry = TCB_ENTRY_OID_PREFIX + bytes([number]) + b"\x02\x01"
        position = der.index(entry) + len(entry)
        svns[number] = der[position]
    return [svns[number] for number in range(1, 17)], svns[17]


def test_tdx_v5_below_all_tcb_levels_rejected() -> None:
    # Intel's rule: a TCB level matches only if every SGX TCB component SVN of the PCK
    # certificate is at least the level's. Component 8 of this platform is 3 and every level
    # listed for its FMSPC needs 5, so it has no TCB status (Intel's QVL: TCB not supported).
    # dcap-qvl 0.3.4 to 0.3.8 compared the 16 components as one byte string, so they matched
    # the 2024-03-13 level and returned OutOfDate; 0.3.9 and later reject as Intel does.
    quote, collateral = load("tdx_quote_outdated")
    assert struct.unpack_from("<HHI", quote) == (5, 2, 0x81)
    with pytest.raises(AttestationError) as caught:
        verify_evidence("tdx", quote, now=OUTDATED_INSIDE, collateral=collateral)
    message = str(caught.value)
    assert message.startswith("tdx quote rejected: its platform TCB matches none of the 3 TCB")
    assert "listed for FMSPC 90C06F000000 (TCB evaluation data number 18)" in message
    assert "lowest level (tcbDate 2018-01-04T00:00:00Z, OutOfDate)" in message
    assert message.endswith(
        "needs SGX TCB component 8 >= 5 where the PCK certificate has 3"
        " (dcap-qvl: No matching TCB level found)"
    )


def test_outdated_pck_tcb_by_independent_parse() -> None:
    quote, collateral = load("tdx_quote_outdated")
    assert collateral.dcap is not None
    components, pce_svn = pck_tcb_from_v5_quote(quote)
    assert components == [3, 3, 2, 2, 4, 1, 0, 3] + [0] * 8
    assert pce_svn == 13
    body = quote[V5_BODY : V5_BODY + TD15_BODY]
    tee_tcb_svn, tee_tcb_svn2 = body[0:16], body[584:600]
    assert tee_tcb_svn.hex() == "07010300000000000000000000000000"
    assert tee_tcb_svn2.hex() == "0d010300000000000000000000000000"

    tcb_info = json.loads(collateral.dcap["tcb_info"])
    assert (tcb_info["id"], tcb_info["fmspc"]) == ("TDX", "90C06F000000")
    levels = [level["tcb"] for level in tcb_info["tcbLevels"]]
    assert len(levels) == 3
    for tcb in levels:
        needed = [component["svn"] for component in tcb["sgxtcbcomponents"]]
        shortfalls = [index + 1 for index in range(16) if components[index] < needed[index]]
        assert shortfalls == [8]
        assert needed[7] == 5
        assert pce_svn >= tcb["pcesvn"]
        # TEE_TCB_SVN[1] is nonzero, so only indexes 2 to 15 count, and they are high enough:
        # the TDX side alone would match every level.
        tdx_needed = [component["svn"] for component in tcb["tdxtcbcomponents"]]
        assert all(tee_tcb_svn[index] >= tdx_needed[index] for index in range(2, 16))


@pytest.mark.parametrize(
    "offset",
    [V5_BODY + 136, V5_BODY + TD15_BODY + 4 + 40],
    ids=["mrtd", "quote-signature"],
)
def test_tdx_v5_signature_checked_before_tcb(offset: int) -> None:
    # A changed byte fails on the signature, so the unchanged quote passed every signature and
    # certificate check and was rejected only for its TCB level.
    quote, collateral = load("tdx_quote_outdated")
    with pytest.raises(AttestationError, match=r"quote rejected: .*signature is invalid"):
        verify_evidence("tdx", flipped(quote, offset), now=OUTDATED_INSIDE, collateral=collateral)


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
