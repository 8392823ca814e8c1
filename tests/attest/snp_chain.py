"""A test ARK → ASK → VCEK chain and SEV-SNP reports signed by it.

AMD's samples cannot show a debug guest, a revoked VCEK or a VCEK for another TCB, so these
tests make their own chain in the same shapes: RSA-PSS ARK and ASK, an ECDSA P-384 VCEK with
AMD's TCB and hwID extensions, and 1184-byte reports signed over bytes 0..0x29F.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclavify.attest import snp

NOT_BEFORE = datetime(2025, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 1, 1, tzinfo=UTC)
CHIP_ID = bytes(range(64))
TCB = bytes([3, 0, 0, 0, 0, 0, 20, 209])  # bootloader 3, tee 0, snp 20, microcode 209
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _der_integer(value: int) -> bytes:
    return bytes([0x02, 0x01, value]) if value < 0x80 else bytes([0x02, 0x02, 0x00, value])


def _unrecognized(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)


@dataclass
class FakeAmdChain:
    product: str = "Genoa"
    ark_key: rsa.RSAPrivateKey = field(init=False)
    ask_key: rsa.RSAPrivateKey = field(init=False)
    ark: x509.Certificate = field(init=False)
    ask: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ark_name = _name(f"ARK-{self.product}")
        self.ark = self._ca(ark_name, ark_name, self.ark_key.public_key(), self.ark_key, serial=1)
        ask_name = _name(f"SEV-{self.product}")
        self.ask = self._ca(ask_name, ark_name, self.ask_key.public_key(), self.ark_key, serial=2)

    def _ca(
        self,
        subject: x509.Name,
        issuer: x509.Name,
        public_key: rsa.RSAPublicKey,
        signer: rsa.RSAPrivateKey,
        *,
        serial: int,
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(NOT_BEFORE)
            .not_valid_after(NOT_BEFORE + timedelta(days=25 * 365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(signer, hashes.SHA384(), rsa_padding=PSS)
        )

    def endorsement_key(
        self,
        *,
        kind: str = "vcek",
        tcb: bytes = TCB,
        chip_id: bytes = CHIP_ID,
        serial: int = 7,
        not_after: datetime | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP384R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("SEV-VCEK" if kind == "vcek" else "SEV-VLEK"))
            .issuer_name(self.ask.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(NOT_BEFORE)
            .not_valid_after(not_after or NOT_BEFORE + timedelta(days=7 * 365))
            .add_extension(_unrecognized(snp.OID_PRODUCT_NAME, b"\x16\x05Genoa"), critical=False)
            .add_extension(
                _unrecognized(snp.OID_BOOTLOADER_SPL, _der_integer(tcb[0])), critical=False
            )
            .add_extension(_unrecognized(snp.OID_TEE_SPL, _der_integer(tcb[1])), critical=False)
            .add_extension(_unrecognized(snp.OID_SNP_SPL, _der_integer(tcb[6])), critical=False)
            .add_extension(_unrecognized(snp.OID_UCODE_SPL, _der_integer(tcb[7])), critical=False)
        )
        if kind == "vcek":
            builder = builder.add_extension(_unrecognized(snp.OID_HWID, chip_id), critical=False)
        return key, builder.sign(self.ask_key, hashes.SHA384(), rsa_padding=PSS)

    def crl(
        self,
        *,
        issuer: str = "ask",
        revoked: tuple[int, ...] = (),
        next_update: datetime = NOW + timedelta(days=7),
    ) -> bytes:
        name, key = (
            (self.ask.subject, self.ask_key)
            if issuer == "ask"
            else (self.ark.subject, self.ark_key)
        )
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(name)
            .last_update(NOT_BEFORE)
            .next_update(next_update)
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(NOT_BEFORE)
                .build()
            )
        crl = builder.sign(key, hashes.SHA384(), rsa_padding=PSS)
        return crl.public_bytes(serialization.Encoding.DER)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def make_report(
    key: ec.EllipticCurvePrivateKey,
    *,
    policy: int = 0x30000,
    signing_key: int = 0,
    report_data: bytes = b"\x11" * 64,
    measurement: bytes = b"\x22" * 48,
    reported_tcb: bytes = TCB,
    committed_tcb: bytes = TCB,
    chip_id: bytes = CHIP_ID,
    signature_algorithm: int = 1,
) -> bytes:
    report = bytearray(snp.REPORT_SIZE)
    struct.pack_into("<IIQ", report, 0x00, 3, 1, policy)
    struct.pack_into("<II", report, 0x30, 0, signature_algorithm)
    report[0x38:0x40] = committed_tcb
    struct.pack_into("<I", report, 0x48, signing_key << 2)
    report[0x50:0x90] = report_data
    report[0x90:0xC0] = measurement
    report[0xC0:0xE0] = b"\x33" * 32
    report[0x180:0x188] = reported_tcb
    report[0x188:0x18B] = bytes([0x19, 0x11, 0x01])
    report[0x1A0:0x1E0] = chip_id
    report[0x1E0:0x1E8] = committed_tcb
    report[0x1F0:0x1F8] = committed_tcb
    r, s = decode_dss_signature(key.sign(bytes(report[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    report[0x2A0:0x2E8] = r.to_bytes(72, "little")
    report[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(report)


def certificate_table(entries: dict[object, bytes]) -> bytes:
    """Lay out a GUID-keyed certificate table as the firmware returns it."""
    header_size = 24 * (len(entries) + 1)
    table = bytearray()
    blobs = bytearray()
    for guid, blob in entries.items():
        offset = header_size + len(blobs)
        table += guid.bytes + struct.pack("<II", offset, len(blob))  # type: ignore[attr-defined]
        blobs += blob
    table += bytes(24)
    return bytes(table + blobs)


def configfs_json(report: bytes, table: bytes | None) -> bytes:
    document = {"provider": "sev_guest\n"}
    document["outblob"] = base64.urlsafe_b64encode(report).decode().rstrip("=")
    if table is not None:
        document["auxblob"] = base64.urlsafe_b64encode(table).decode().rstrip("=")
    return json.dumps(document).encode()
