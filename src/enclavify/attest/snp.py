"""AMD SEV-SNP attestation report parsing and verification.

The report layout, the certificate table GUIDs and the VCEK extension OIDs follow AMD's
"SEV Secure Nested Paging Firmware ABI Specification" (report structure, version 2 and later)
and "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface Specification".

Verification steps:

1. Parse the 1184-byte report; the signature algorithm must be ECDSA P-384 with SHA-384.
2. Pick the endorsement key the report names (VCEK or VLEK) from the collateral or the
   certificate table the guest read with the report (the configfs-tsm ``auxblob``).
3. Check the chain endorsement key → ASK (or ASVK) → ARK at ``now``, where the ARK must be one
   of AMD's roots shipped in ``attest/amd/`` or an ARK passed as collateral. An ARK found in
   the evidence is ignored: anyone can make a chain that ends in a self-signed root.
4. Check CRLs passed as collateral: signed by the certificate's issuer, current at ``now``,
   not listing any certificate of the chain.
5. Check the report signature over bytes 0..0x29F with the endorsement key.
6. Check that the VCEK's TCB extensions equal the report's REPORTED_TCB and that its hwID
   equals CHIP_ID, since a VCEK is derived for exactly one chip and TCB.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import struct
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from enclavify.attest.claims import SEV_SNP, Claims
from enclavify.attest.collateral import Collateral
from enclavify.errors import AttestationError

log = logging.getLogger(__name__)

REPORT_SIZE = 0x4A0  # 1184 bytes
SIGNED_SIZE = 0x2A0  # the signature covers the report up to its signature field
SIGNATURE_ALGORITHM_ECDSA_P384_SHA384 = 1
POLICY_DEBUG = 1 << 19

# Entries of the certificate table the firmware returns with an extended report request.
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
_TABLE_ENTRY = struct.Struct("<16sII")

# VCEK certificate extensions (AMD KDS interface specification).
OID_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
OID_BOOTLOADER_SPL = "1.3.6.1.4.1.3704.1.3.1"
OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
OID_FMC_SPL = "1.3.6.1.4.1.3704.1.3.9"
OID_HWID = "1.3.6.1.4.1.3704.1.4"

PRODUCTS = ("Milan", "Genoa", "Turin")


@dataclass(frozen=True)
class TcbVersion:
    """The security patch levels of one TCB_VERSION field."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: bytes, *, turin: bool) -> TcbVersion:
        # Turin added an FMC level and moved the others; Milan and Genoa keep bytes 2-5 reserved.
        if turin:
            return cls(fmc=raw[0], bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7])
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def as_dict(self) -> dict[str, int]:
        levels = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp}
        levels["microcode"] = self.microcode
        if self.fmc is not None:
            levels["fmc"] = self.fmc
        return levels

    def below(self, other: TcbVersion) -> bool:
        """Return whether any level is lower than the same level of ``other``."""
        mine, theirs = self.as_dict(), other.as_dict()
        return any(mine[name] < theirs.get(name, 0) for name in mine)


@dataclass(frozen=True)
class SnpReport:
    """The fields of an attestation report that verification and policy use."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algorithm: int
    current_tcb: bytes
    platform_info: int
    signing_key: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    reported_tcb: bytes
    cpuid_family: int | None
    cpuid_model: int | None
    chip_id: bytes
    committed_tcb: bytes
    launch_tcb: bytes
    signature_r: int
    signature_s: int

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)


def parse_report(data: bytes) -> SnpReport:
    """Parse a raw SEV-SNP attestation report.

    Raises:
        AttestationError: if it is not 1184 bytes or its version is below 2.
    """
    if len(data) != REPORT_SIZE:
        raise AttestationError(f"SEV-SNP report is {len(data)} bytes, expected {REPORT_SIZE}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0x00)
    if version < 2:
        raise AttestationError(f"unsupported SEV-SNP report version {version}")
    vmpl, signature_algorithm = struct.unpack_from("<II", data, 0x30)
    (platform_info,) = struct.unpack_from("<Q", data, 0x40)
    (key_flags,) = struct.unpack_from("<I", data, 0x48)
    # CPUID family and model were added in report version 3; earlier reports leave them zero.
    has_cpuid = version >= 3
    return SnpReport(
        raw=data,
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=data[0x10:0x20],
        image_id=data[0x20:0x30],
        vmpl=vmpl,
        signature_algorithm=signature_algorithm,
        current_tcb=data[0x38:0x40],
        platform_info=platform_info,
        signing_key=(key_flags >> 2) & 0x7,
        report_data=data[0x50:0x90],
        measurement=data[0x90:0xC0],
        host_data=data[0xC0:0xE0],
        id_key_digest=data[0xE0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        reported_tcb=data[0x180:0x188],
        cpuid_family=data[0x188] if has_cpuid else None,
        cpuid_model=data[0x189] if has_cpuid else None,
        chip_id=data[0x1A0:0x1E0],
        committed_tcb=data[0x1E0:0x1E8],
        launch_tcb=data[0x1F0:0x1F8],
        signature_r=int.from_bytes(data[0x2A0:0x2E8], "little"),
        signature_s=int.from_bytes(data[0x2E8:0x330], "little"),
    )


def parse_certificate_table(table: bytes) -> dict[uuid.UUID, bytes]:
    """Parse the GUID-keyed certificate table of an extended report (the configfs ``auxblob``).

    Each entry is a 16-byte GUID, a 32-bit offset and a 32-bit length, both relative to the
    table start; an all-zero entry ends the table.

    Raises:
        AttestationError: if the table has no terminator or an entry points outside it.
    """
    entries: dict[uuid.UUID, bytes] = {}
    position = 0
    while True:
        if position + _TABLE_ENTRY.size > len(table):
            raise AttestationError("SEV-SNP certificate table has no terminating entry")
        guid_bytes, offset, length = _TABLE_ENTRY.unpack_from(table, position)
        position += _TABLE_ENTRY.size
        if guid_bytes == bytes(16) and offset == 0 and length == 0:
            return entries
        guid = uuid.UUID(bytes=guid_bytes)
        if offset + length > len(table):
            raise AttestationError(
                f"SEV-SNP certificate table entry {guid} points outside the table"
            )
        entries[guid] = table[offset : offset + length]


def split_evidence(data: bytes) -> tuple[bytes, bytes | None]:
    """Return (report, certificate table or None) from a raw report or the configfs JSON form.

    The JSON form is ``{"outblob": b64, "auxblob": b64, "provider": "sev_guest"}``, with
    base64url or standard base64, as a configfs-tsm reader stores it.

    Raises:
        AttestationError: if the data is neither.
    """
    if len(data) == REPORT_SIZE:
        return data, None
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise AttestationError(
            f"SEV-SNP evidence is neither a {REPORT_SIZE}-byte report nor configfs-tsm JSON"
        ) from error
    if not isinstance(document, dict) or "outblob" not in document:
        raise AttestationError("SEV-SNP configfs-tsm JSON lacks 'outblob'")
    provider = str(document.get("provider", "sev_guest")).strip()
    if provider != "sev_guest":
        raise AttestationError(f"configfs-tsm provider {provider!r} is not sev_guest")
    report = decode_base64(document["outblob"], "outblob")
    auxblob = document.get("auxblob")
    return report, decode_base64(auxblob, "auxblob") if auxblob else None


def decode_base64(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise AttestationError(f"SEV-SNP {name} must be a base64 string")
    text = value.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error as error:
        raise AttestationError(f"SEV-SNP {name} is not valid base64") from error


def load_certificate(blob: bytes) -> x509.Certificate:
    """Load a DER or PEM certificate, including AMD's VCEKs whose serial number is zero."""
    try:
        with warnings.catch_warnings():
            # VCEKs carry serial number 0, which RFC 5280 forbids and cryptography warns about.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            if blob.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(blob)
            return x509.load_der_x509_certificate(der_prefix(blob))
    except ValueError as error:
        raise AttestationError(f"invalid certificate in SEV-SNP collateral: {error}") from error


def der_prefix(blob: bytes) -> bytes:
    """Return the DER element at the start of ``blob``, without the padding after it.

    Certificate table entries may be padded with zero bytes. Stripping trailing zeros instead
    would also cut a certificate whose own encoding ends in zero bytes.
    """
    if len(blob) < 2:
        return blob
    first = blob[1]
    if first < 0x80:
        return blob[: 2 + first]
    count = first & 0x7F
    if count == 0 or count > 4 or len(blob) < 2 + count:
        return blob
    length = int.from_bytes(blob[2 : 2 + count], "big")
    return blob[: 2 + count + length]


def load_crl(blob: bytes) -> x509.CertificateRevocationList:
    try:
        if blob.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(blob)
        return x509.load_der_x509_crl(blob)
    except ValueError as error:
        raise AttestationError(f"invalid CRL in SEV-SNP collateral: {error}") from error


@cache
def amd_root_keys() -> tuple[bytes, ...]:
    """Return the DER encodings of AMD's ARKs shipped with enclavify."""
    roots = []
    for product in PRODUCTS:
        pem = resources.files("enclavify.attest").joinpath(f"amd/ark-{product.lower()}.pem")
        roots.append(load_certificate(pem.read_bytes()).public_bytes(serialization.Encoding.DER))
    return tuple(roots)


class SnpVerifier:
    """SEV-SNP attestation reports, signed by a VCEK or VLEK that chains to an AMD ARK."""

    evidence_type = SEV_SNP

    def __init__(self, *, trust_amd_roots: bool = True) -> None:
        self._trust_amd_roots = trust_amd_roots

    def verify(self, data: bytes, *, now: datetime, collateral: Collateral | None) -> Claims:
        """Verify a report (raw or configfs-tsm JSON) at ``now``.

        Raises:
            AttestationError: on a malformed report, a missing, invalid, expired, revoked or
                untrusted certificate, a bad signature, or a VCEK that does not match the
                report's chip or TCB.
        """
        raw, table = split_evidence(data)
        report = parse_report(raw)
        if report.signature_algorithm != SIGNATURE_ALGORITHM_ECDSA_P384_SHA384:
            raise AttestationError(
                f"unsupported SEV-SNP signature algorithm {report.signature_algorithm}"
            )

        chain = _Chain.build(report, table, collateral, self._trust_amd_roots)
        chain.check_validity(now)
        chain.check_signatures()
        chain.check_revocation(collateral, now)
        _check_report_signature(report, chain.leaf)
        product = chain.product()
        turin = product == "Turin"
        reported = TcbVersion.decode(report.reported_tcb, turin=turin)
        if chain.leaf_kind == "vcek":
            _check_vcek_binding(chain.leaf, report, reported)
        return _claims(report, reported, product, chain.leaf_kind, turin=turin)


@dataclass
class _Chain:
    leaf: x509.Certificate
    leaf_kind: str
    intermediate: x509.Certificate
    root: x509.Certificate

    @classmethod
    def build(
        cls,
        report: SnpReport,
        table: bytes | None,
        collateral: Collateral | None,
        trust_amd_roots: bool,
    ) -> _Chain:
        entries = parse_certificate_table(table) if table else {}
        supplied = [
            load_certificate(blob) for blob in (collateral.certificates if collateral else ())
        ]
        carried = [load_certificate(blob) for guid, blob in entries.items() if guid != GUID_ARK]

        if report.signing_key == 0:
            leaf_kind, leaf_guid, leaf_name = "vcek", GUID_VCEK, "SEV-VCEK"
        elif report.signing_key == 1:
            leaf_kind, leaf_guid, leaf_name = "vlek", GUID_VLEK, "SEV-VLEK"
        else:
            raise AttestationError(
                f"SEV-SNP report signing key {report.signing_key} is not VCEK or VLEK"
            )

        leaves = [cert for cert in supplied if _common_name(cert) == leaf_name]
        if not leaves and leaf_guid in entries:
            leaves = [load_certificate(entries[leaf_guid])]
        if not leaves:
            raise AttestationError(
                f"no {leaf_kind.upper()} certificate in the evidence or collateral"
            )
        leaf = leaves[0]

        intermediate = _issuer_of(leaf, supplied + carried)
        if intermediate is None:
            raise AttestationError(
                f"no ASK certificate issued {leaf_kind.upper()} {leaf.issuer.rfc4514_string()!r}"
            )

        anchors = [cert for cert in supplied if cert.issuer == cert.subject]
        if trust_amd_roots:
            anchors += [load_certificate(der) for der in amd_root_keys()]
        root = _issuer_of(intermediate, anchors)
        if root is None:
            subject = intermediate.subject.rfc4514_string()
            raise AttestationError(f"ASK {subject!r} does not chain to a trusted AMD root key")
        return cls(leaf=leaf, leaf_kind=leaf_kind, intermediate=intermediate, root=root)

    def certificates(self) -> tuple[tuple[str, x509.Certificate], ...]:
        return (
            (self.leaf_kind.upper(), self.leaf),
            ("ASK", self.intermediate),
            ("ARK", self.root),
        )

    def check_validity(self, now: datetime) -> None:
        for role, cert in self.certificates():
            if now < cert.not_valid_before_utc:
                start = cert.not_valid_before_utc.isoformat()
                raise AttestationError(f"{role} certificate is not valid before {start}")
            if now > cert.not_valid_after_utc:
                raise AttestationError(
                    f"{role} certificate expired at {cert.not_valid_after_utc.isoformat()}"
                )

    def check_signatures(self) -> None:
        pairs = (
            ("ARK", self.root, self.root),
            ("ASK", self.intermediate, self.root),
            (self.leaf_kind.upper(), self.leaf, self.intermediate),
        )
        for role, cert, issuer in pairs:
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature) as error:
                raise AttestationError(
                    f"{role} certificate signature is invalid: {error}"
                ) from error

    def check_revocation(self, collateral: Collateral | None, now: datetime) -> None:
        crls = [load_crl(blob) for blob in (collateral.crls if collateral else ())]
        for crl in crls:
            issuer = next(
                (cert for _, cert in self.certificates() if cert.subject == crl.issuer), None
            )
            if issuer is None:
                continue
            if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                raise AttestationError(
                    f"CRL of {crl.issuer.rfc4514_string()!r} has an invalid signature"
                )
            if now < crl.last_update_utc:
                raise AttestationError(f"CRL of {crl.issuer.rfc4514_string()!r} is not valid yet")
            if crl.next_update_utc is not None and now > crl.next_update_utc:
                issuer_name = crl.issuer.rfc4514_string()
                raise AttestationError(
                    f"CRL of {issuer_name!r} expired at {crl.next_update_utc.isoformat()}"
                )
            for role, cert in self.certificates():
                if cert.issuer != crl.issuer or cert is self.root:
                    continue
                if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                    raise AttestationError(
                        f"{role} certificate (serial {cert.serial_number:#x}) is revoked"
                    )

    def product(self) -> str:
        for _, cert in self.certificates():
            name = _common_name(cert)
            for product in PRODUCTS:
                if name.endswith("-" + product):
                    return product
        extension = _extension(self.leaf, OID_PRODUCT_NAME)
        if extension is not None:
            text = _der_string(extension)
            for product in PRODUCTS:
                if text.startswith(product):
                    return product
        raise AttestationError(
            "cannot tell the SEV-SNP processor product from the certificate chain"
        )


def _check_report_signature(report: SnpReport, leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationError("SEV-SNP endorsement key is not an ECDSA P-384 key")
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        key.verify(signature, report.raw[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as error:
        raise AttestationError("SEV-SNP report signature is invalid") from error


def _check_vcek_binding(vcek: x509.Certificate, report: SnpReport, reported: TcbVersion) -> None:
    expected = {
        "bootloader": OID_BOOTLOADER_SPL,
        "tee": OID_TEE_SPL,
        "snp": OID_SNP_SPL,
        "microcode": OID_UCODE_SPL,
    }
    if reported.fmc is not None:
        expected["fmc"] = OID_FMC_SPL
    levels = reported.as_dict()
    for name, oid in expected.items():
        value = _extension(vcek, oid)
        if value is None:
            raise AttestationError(f"VCEK lacks its {name} TCB extension")
        certified = _der_integer(value)
        if certified != levels[name]:
            raise AttestationError(
                f"VCEK is for {name} level {certified},"
                f" the report's REPORTED_TCB has {levels[name]}"
            )
    hwid = _extension(vcek, OID_HWID)
    # A guest policy may ask the firmware to mask CHIP_ID to zeros; then nothing is compared.
    if hwid is not None and any(report.chip_id):
        if len(hwid) != len(report.chip_id):
            hwid = _der_octet_string(hwid)
        if hwid != report.chip_id:
            raise AttestationError("VCEK was issued for another chip than the report's CHIP_ID")


def _claims(
    report: SnpReport, reported: TcbVersion, product: str, signing_key: str, *, turin: bool
) -> Claims:
    committed = TcbVersion.decode(report.committed_tcb, turin=turin)
    current = TcbVersion.decode(report.current_tcb, turin=turin)
    # SEV-SNP has no TCB status service. A report vouched for by an older TCB than the firmware
    # has committed to means the endorsement could come from a vulnerable firmware's key.
    # NOTE: AMD's minimum TCB per security bulletin is not consulted; UpToDate only means the
    # reported TCB is not below the committed one.
    status = "OutOfDate" if reported.below(committed) else "UpToDate"
    details: dict[str, Any] = {
        "product": product,
        "signing_key": signing_key,
        "version": report.version,
        "guest_svn": report.guest_svn,
        "policy": f"{report.policy:#x}",
        "vmpl": report.vmpl,
        "family_id": report.family_id.hex(),
        "image_id": report.image_id.hex(),
        "host_data": report.host_data.hex(),
        "id_key_digest": report.id_key_digest.hex(),
        "author_key_digest": report.author_key_digest.hex(),
        "report_id": report.report_id.hex(),
        "chip_id": report.chip_id.hex(),
        "platform_info": f"{report.platform_info:#x}",
        "reported_tcb": reported.as_dict(),
        "committed_tcb": committed.as_dict(),
        "current_tcb": current.as_dict(),
        "launch_tcb": TcbVersion.decode(report.launch_tcb, turin=turin).as_dict(),
    }
    return Claims(
        evidence_type=SEV_SNP,
        measurement=report.measurement.hex(),
        report_data=report.report_data,
        debug=report.debug,
        tcb_status=status,
        details=details,
    )


def _issuer_of(
    cert: x509.Certificate, candidates: list[x509.Certificate]
) -> x509.Certificate | None:
    """Return the candidate that signed ``cert``, else the first with the issuer's name.

    Preferring the one whose key verifies keeps a decoy with the same name (say, a forged ASK
    placed first in the certificate table) from hiding the real issuer. A name match whose
    signature fails is still returned, so the signature check reports it.
    """
    named = [candidate for candidate in candidates if candidate.subject == cert.issuer]
    for candidate in named:
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return named[0] if named else None


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _extension(cert: x509.Certificate, oid: str) -> bytes | None:
    for extension in cert.extensions:
        if extension.oid.dotted_string == oid and isinstance(
            extension.value, x509.UnrecognizedExtension
        ):
            return extension.value.value
    return None


def _der_integer(value: bytes) -> int:
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2:
        raise AttestationError("VCEK TCB extension is not a DER INTEGER")
    return int.from_bytes(value[2:], "big", signed=True)


def _der_octet_string(value: bytes) -> bytes:
    if len(value) >= 2 and value[0] == 0x04 and value[1] == len(value) - 2:
        return value[2:]
    return value


def _der_string(value: bytes) -> str:
    if len(value) >= 2 and value[1] == len(value) - 2:
        return value[2:].decode("ascii", "replace")
    return value.decode("ascii", "replace")
