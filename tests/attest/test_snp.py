"""SEV-SNP reports: AMD's real Genoa sample and reports signed by a test chain."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization

from enclavify.attest import snp
from enclavify.attest.collateral import Collateral
from enclavify.attest.verify import verify_evidence
from enclavify.errors import AttestationError

from .samples import sample
from .snp_chain import (
    CHIP_ID,
    NOW,
    FakeAmdChain,
    certificate_table,
    configfs_json,
    der,
    make_report,
)

# The sample's VCEK is valid from 2025-04-20 to 2032-04-20; AMD's roots until 2047.
INSIDE = datetime(2026, 1, 1, tzinfo=UTC)

ARK_SHA256 = {
    "milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}


def b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def real_sample() -> tuple[bytes, dict[str, str]]:
    data = sample("veraison/sevsnp-tsm-report.json").read_bytes()
    return data, json.loads(data)


def with_outblob(document: dict[str, str], report: bytes) -> bytes:
    changed = dict(document)
    changed["outblob"] = base64.urlsafe_b64encode(report).decode().rstrip("=")
    return json.dumps(changed).encode()


def flipped(data: bytes, offset: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 0x01
    return bytes(changed)


# ---------------------------------------------------------------- AMD's real sample


def test_shipped_arks_match_published_digests() -> None:
    roots = snp.amd_root_keys()
    assert [hashlib.sha256(root).hexdigest() for root in roots] == [
        ARK_SHA256[product.lower()] for product in snp.PRODUCTS
    ]


def test_genoa_sample_verifies_through_shipped_ark() -> None:
    data, _ = real_sample()
    claims = verify_evidence("sev-snp", data, now=INSIDE)
    assert claims.evidence_type == "sev-snp"
    assert claims.tcb_status == "UpToDate"
    assert claims.debug is False
    assert claims.details["product"] == "Genoa"
    assert claims.details["signing_key"] == "vcek"


def test_genoa_claims_match_independent_parse() -> None:
    data, document = real_sample()
    report = b64(document["outblob"])
    claims = verify_evidence("sev-snp", data, now=INSIDE)
    assert len(report) == 1184
    assert claims.measurement == report[0x90:0xC0].hex()
    assert claims.measurement.startswith("7699e6ac12ccdfd1dfac70e649ce1f046cb2afbb")
    assert claims.report_data == report[0x50:0x90]
    assert claims.details["host_data"] == report[0xC0:0xE0].hex()
    assert claims.details["chip_id"] == report[0x1A0:0x1E0].hex()
    assert claims.details["policy"] == hex(struct.unpack_from("<Q", report, 8)[0]) == "0x30000"
    assert claims.details["reported_tcb"] == {
        "bootloader": 10,
        "tee": 0,
        "snp": 23,
        "microcode": 84,
    }


def test_genoa_certificate_table_has_ark_ask_vcek() -> None:
    _, document = real_sample()
    entries = snp.parse_certificate_table(b64(document["auxblob"]))
    assert set(entries) == {snp.GUID_ARK, snp.GUID_ASK, snp.GUID_VCEK}
    assert (
        hashlib.sha256(der(snp.load_certificate(entries[snp.GUID_ARK]))).hexdigest()
        == (ARK_SHA256["genoa"])
    )


@pytest.mark.parametrize(
    ("offset", "part"),
    [
        (0x90, "measurement"),
        (0x50, "report data"),
        (0x08, "policy"),
        (0x2A0, "signature r"),
        (0x2E8, "signature s"),
    ],
)
def test_genoa_flipped_bit_is_rejected(offset: int, part: str) -> None:
    _, document = real_sample()
    report = flipped(b64(document["outblob"]), offset)
    with pytest.raises(AttestationError, match="report signature is invalid"):
        verify_evidence("sev-snp", with_outblob(document, report), now=INSIDE)


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        (datetime(2025, 4, 1, tzinfo=UTC), "VCEK certificate is not valid before 2025-04-20"),
        (datetime(2032, 5, 1, tzinfo=UTC), "VCEK certificate expired at 2032-04-20"),
    ],
)
def test_genoa_outside_vcek_validity_is_rejected(now: datetime, reason: str) -> None:
    data, _ = real_sample()
    with pytest.raises(AttestationError, match=reason):
        verify_evidence("sev-snp", data, now=now)


def test_raw_report_without_certificates_is_rejected() -> None:
    _, document = real_sample()
    with pytest.raises(AttestationError, match="no VCEK certificate"):
        verify_evidence("sev-snp", b64(document["outblob"]), now=INSIDE)


def test_raw_report_with_vcek_collateral_verifies() -> None:
    _, document = real_sample()
    entries = snp.parse_certificate_table(b64(document["auxblob"]))
    collateral = Collateral.from_pem_or_der([entries[snp.GUID_VCEK], entries[snp.GUID_ASK]])
    claims = verify_evidence("sev-snp", b64(document["outblob"]), now=INSIDE, collateral=collateral)
    assert claims.details["product"] == "Genoa"


# ---------------------------------------------------------------- a test chain


@pytest.fixture(scope="module")
def chain() -> FakeAmdChain:
    return FakeAmdChain()


def anchored(chain: FakeAmdChain, *extra: bytes, crls: tuple[bytes, ...] = ()) -> Collateral:
    """Collateral that makes the test ARK a trust anchor, as an operator's files would."""
    return Collateral(certificates=(der(chain.ark), *extra), crls=crls)


def evidence(chain: FakeAmdChain, **report_fields: object) -> tuple[bytes, bytes]:
    key, vcek = chain.endorsement_key()
    report = make_report(key, **report_fields)  # type: ignore[arg-type]
    table = certificate_table({snp.GUID_VCEK: der(vcek), snp.GUID_ASK: der(chain.ask)})
    return configfs_json(report, table), der(vcek)


def test_test_chain_report_verifies(chain: FakeAmdChain) -> None:
    data, _ = evidence(chain)
    claims = verify_evidence("sev-snp", data, now=NOW, collateral=anchored(chain))
    assert claims.measurement == "22" * 48
    assert claims.report_data == b"\x11" * 64
    assert claims.debug is False
    assert claims.tcb_status == "UpToDate"


def test_debug_policy_bit_is_reported(chain: FakeAmdChain) -> None:
    data, _ = evidence(chain, policy=0x30000 | snp.POLICY_DEBUG)
    claims = verify_evidence("sev-snp", data, now=NOW, collateral=anchored(chain))
    assert claims.debug is True


def test_test_chain_without_anchor_is_rejected(chain: FakeAmdChain) -> None:
    data, _ = evidence(chain)
    with pytest.raises(AttestationError, match="does not chain to a trusted AMD root key"):
        verify_evidence("sev-snp", data, now=NOW)


def test_ark_carried_in_evidence_is_not_trusted(chain: FakeAmdChain) -> None:
    key, vcek = chain.endorsement_key()
    table = certificate_table(
        {snp.GUID_ARK: der(chain.ark), snp.GUID_ASK: der(chain.ask), snp.GUID_VCEK: der(vcek)}
    )
    with pytest.raises(AttestationError, match="does not chain to a trusted AMD root key"):
        verify_evidence("sev-snp", configfs_json(make_report(key), table), now=NOW)


def test_revoked_vcek_is_rejected(chain: FakeAmdChain) -> None:
    data, _ = evidence(chain)
    crl = chain.crl(issuer="ask", revoked=(7,))
    with pytest.raises(AttestationError, match=r"VCEK certificate \(serial 0x7\) is revoked"):
        verify_evidence("sev-snp", data, now=NOW, collateral=anchored(chain, crls=(crl,)))


def test_revoked_ask_is_rejected(chain: FakeAmdChain) -> None:
    data, _ = evidence(chain)
    crl = chain.crl(issuer="ark", revoked=(2,))
    with pytest.raises(AttestationError, match=r"ASK certificate \(serial 0x2\) is revoked"):
        verify_evidence("sev-snp", data, now=NOW, collateral=anchored(chain, crls=(crl,)))


def test_current_crl_without_the_vcek_passes(chain: FakeAmdChain) -> None:
    data, _ = evidence(chain)
    crl = chain.crl(issuer="ask", revoked=(99,))
    claims = verify_evidence("sev-snp", data, now=NOW, collateral=anchored(chain, crls=(crl,)))
    assert claims.tcb_status == "UpToDate"


def test_expired_crl_is_rejected(chain: FakeAmdChain) -> None:
    data, _ = evidence(chain)
    crl = chain.crl(issuer="ask", next_update=NOW - timedelta(days=1))
    with pytest.raises(AttestationError, match=r"CRL of .* expired"):
        verify_evidence("sev-snp", data, now=NOW, collateral=anchored(chain, crls=(crl,)))


def test_forged_crl_is_rejected(chain: FakeAmdChain) -> None:
    data, _ = evidence(chain)
    other = FakeAmdChain()
    # Same issuer name as the real ASK, signed by another key.
    crl = other.crl(issuer="ask")
    with pytest.raises(AttestationError, match="has an invalid signature"):
        verify_evidence("sev-snp", data, now=NOW, collateral=anchored(chain, crls=(crl,)))


def test_vcek_for_other_tcb_is_rejected(chain: FakeAmdChain) -> None:
    key, vcek = chain.endorsement_key(tcb=bytes([3, 0, 0, 0, 0, 0, 19, 209]))
    table = certificate_table({snp.GUID_VCEK: der(vcek), snp.GUID_ASK: der(chain.ask)})
    with pytest.raises(
        AttestationError, match="VCEK is for snp level 19, the report's REPORTED_TCB has 20"
    ):
        verify_evidence(
            "sev-snp", configfs_json(make_report(key), table), now=NOW, collateral=anchored(chain)
        )


def test_vcek_for_other_chip_is_rejected(chain: FakeAmdChain) -> None:
    key, vcek = chain.endorsement_key(chip_id=bytes(reversed(CHIP_ID)))
    table = certificate_table({snp.GUID_VCEK: der(vcek), snp.GUID_ASK: der(chain.ask)})
    with pytest.raises(AttestationError, match="another chip"):
        verify_evidence(
            "sev-snp", configfs_json(make_report(key), table), now=NOW, collateral=anchored(chain)
        )


def test_vcek_of_other_key_is_rejected(chain: FakeAmdChain) -> None:
    key, _ = chain.endorsement_key()
    _, other_vcek = chain.endorsement_key()
    table = certificate_table({snp.GUID_VCEK: der(other_vcek), snp.GUID_ASK: der(chain.ask)})
    with pytest.raises(AttestationError, match="report signature is invalid"):
        verify_evidence(
            "sev-snp", configfs_json(make_report(key), table), now=NOW, collateral=anchored(chain)
        )


def test_reported_tcb_below_committed_is_out_of_date(chain: FakeAmdChain) -> None:
    newer = bytes([3, 0, 0, 0, 0, 0, 21, 209])
    data, _ = evidence(chain, committed_tcb=newer)
    claims = verify_evidence("sev-snp", data, now=NOW, collateral=anchored(chain))
    assert claims.tcb_status == "OutOfDate"


def test_vlek_signed_report_verifies(chain: FakeAmdChain) -> None:
    key, vlek = chain.endorsement_key(kind="vlek")
    table = certificate_table({snp.GUID_VLEK: der(vlek), snp.GUID_ASK: der(chain.ask)})
    data = configfs_json(make_report(key, signing_key=1), table)
    claims = verify_evidence("sev-snp", data, now=NOW, collateral=anchored(chain))
    assert claims.details["signing_key"] == "vlek"


def test_vcek_in_collateral_and_raw_report_verifies(chain: FakeAmdChain) -> None:
    key, vcek = chain.endorsement_key()
    pem = b"".join(
        cert.public_bytes(serialization.Encoding.PEM) for cert in (vcek, chain.ask, chain.ark)
    )
    collateral = Collateral.from_pem_or_der([pem])
    claims = verify_evidence("sev-snp", make_report(key), now=NOW, collateral=collateral)
    assert claims.report_data == b"\x11" * 64


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda report: report[:1000], "neither a 1184-byte report"),
        (lambda report: struct.pack("<I", 1) + report[4:], "unsupported SEV-SNP report version 1"),
    ],
    ids=["truncated", "version-1"],
)
def test_malformed_report_is_rejected(chain: FakeAmdChain, mutate: object, reason: str) -> None:
    key, _ = chain.endorsement_key()
    with pytest.raises(AttestationError, match=reason):
        verify_evidence("sev-snp", mutate(make_report(key)), now=NOW, collateral=anchored(chain))  # type: ignore[operator]


def test_unknown_signature_algorithm_is_rejected(chain: FakeAmdChain) -> None:
    data, _ = evidence(chain, signature_algorithm=2)
    with pytest.raises(AttestationError, match="unsupported SEV-SNP signature algorithm 2"):
        verify_evidence("sev-snp", data, now=NOW, collateral=anchored(chain))


def test_certificate_table_without_terminator_is_rejected() -> None:
    table = snp.GUID_VCEK.bytes + struct.pack("<II", 24, 0)
    with pytest.raises(AttestationError, match="no terminating entry"):
        snp.parse_certificate_table(table)


def test_certificate_table_entry_outside_is_rejected() -> None:
    table = bytearray(certificate_table({snp.GUID_VCEK: b"x" * 10}))
    struct.pack_into("<I", table, 20, 4096)
    with pytest.raises(AttestationError, match="points outside the table"):
        snp.parse_certificate_table(bytes(table))


def test_decoy_ask_is_skipped(chain: FakeAmdChain) -> None:
    key, vcek = chain.endorsement_key()
    decoy = FakeAmdChain()
    report = make_report(key)
    table = certificate_table({snp.GUID_VCEK: der(vcek), snp.GUID_ASK: der(decoy.ask)})
    collateral = anchored(chain, der(chain.ask))
    claims = verify_evidence(
        "sev-snp", configfs_json(report, table), now=NOW, collateral=collateral
    )
    assert claims.measurement == "22" * 48


def test_ask_signed_by_other_root_is_rejected(chain: FakeAmdChain) -> None:
    other = FakeAmdChain()
    key, vcek = chain.endorsement_key()
    table = certificate_table({snp.GUID_VCEK: der(vcek), snp.GUID_ASK: der(chain.ask)})
    # The other chain's ARK has the same name as this chain's ARK but another key.
    collateral = Collateral(certificates=(der(other.ark),))
    with pytest.raises(AttestationError, match="ASK certificate signature is invalid"):
        verify_evidence(
            "sev-snp", configfs_json(make_report(key), table), now=NOW, collateral=collateral
        )


def test_der_padding_is_cut_at_element_end() -> None:
    # A certificate's own encoding may end in zero bytes; only the padding after it goes.
    element = b"\x30\x03\x02\x01\x00"
    assert snp.der_prefix(element + b"\x00" * 8) == element
    long_form = b"\x30\x81\x81" + b"\x00" * 0x81
    assert snp.der_prefix(long_form + b"\x00" * 3) == long_form
