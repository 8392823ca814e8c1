"""SGX DCAP and TDX quote verification through dcap-qvl.

dcap-qvl (the PyPI package of Phala Network's Rust quote verification library) checks the
quote's ECDSA signature, the attestation key's binding to the quoting enclave report, the PCK
certificate chain up to Intel's SGX root CA with its CRLs, and the TCB info and QE identity
with their signatures and validity windows at the given time. What it returns becomes
:class:`Claims`; its refusals become :class:`AttestationError` with its reason.
"""

from __future__ import annotations

import json
import logging
import struct
from datetime import datetime
from typing import Any

from enclavify.attest.claims import SGX_DCAP, TDX, Claims
from enclavify.attest.collateral import Collateral
from enclavify.errors import AttestationError

log = logging.getLogger(__name__)

# The quote header: version (u16), attestation key type (u16), TEE type (u32; reserved and
# zero in version 3), then QE SVN, PCE SVN, QE vendor id and user data, 48 bytes in all.
HEADER_SIZE = 48
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
SGX_QUOTE_VERSIONS = (3, 4, 5)
TDX_QUOTE_VERSIONS = (4, 5)

# ATTRIBUTES.DEBUG of an SGX enclave (bit 1 of the flags) and TDATTRIBUTES.DEBUG of a TD
# (bit 0), as defined by Intel's SGX and TDX architecture specifications.
SGX_DEBUG_FLAG = 0x02
TDX_DEBUG_FLAG = 0x01


def quote_header(data: bytes) -> tuple[int, int]:
    """Return a quote's (version, TEE type) from its header.

    Raises:
        AttestationError: if the data is shorter than a quote header.
    """
    if len(data) < HEADER_SIZE:
        raise AttestationError(
            f"quote is {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header"
        )
    version, _key_type, tee_type = struct.unpack_from("<HHI", data)
    return version, tee_type


class _DcapVerifier:
    evidence_type: str
    tee_type: int
    versions: tuple[int, ...]

    def verify(self, data: bytes, *, now: datetime, collateral: Collateral | None) -> Claims:
        """Verify a quote against dcap-qvl collateral at ``now``.

        Raises:
            AttestationError: the quote has the wrong version or TEE type, the collateral is
                missing or unreadable, or dcap-qvl rejects the quote (bad signature, chain,
                CRL, expired or not yet valid collateral, no matching TCB level).
        """
        version, tee_type = quote_header(data)
        if tee_type != self.tee_type:
            raise AttestationError(
                f"{self.evidence_type} quote has TEE type {tee_type:#x},"
                f" expected {self.tee_type:#x}"
            )
        if version not in self.versions:
            raise AttestationError(f"unsupported {self.evidence_type} quote version {version}")
        if collateral is None or collateral.dcap is None:
            raise AttestationError(
                f"{self.evidence_type} quotes need DCAP collateral, none was given"
            )

        dcap_qvl = _dcap_qvl()
        try:
            quote_collateral = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(collateral.dcap))
        except ValueError as error:
            raise AttestationError(f"invalid DCAP collateral: {error}") from error
        try:
            verified = dcap_qvl.verify(data, quote_collateral, int(now.timestamp()))
        except ValueError as error:
            raise AttestationError(f"{self.evidence_type} quote rejected: {error}") from error

        result: dict[str, Any] = json.loads(verified.to_json())
        status = str(result["status"])
        advisories = tuple(str(advisory) for advisory in result.get("advisory_ids", ()))
        log.debug(
            "%s quote verified: status %s, advisories %s", self.evidence_type, status, advisories
        )
        return self._claims(result["report"], status, advisories)

    def _claims(self, report: dict[str, Any], status: str, advisories: tuple[str, ...]) -> Claims:
        raise NotImplementedError


class SgxVerifier(_DcapVerifier):
    """SGX DCAP ECDSA quotes (version 3; later versions when dcap-qvl accepts them)."""

    evidence_type = SGX_DCAP
    tee_type = TEE_TYPE_SGX
    versions = SGX_QUOTE_VERSIONS

    def _claims(self, report: dict[str, Any], status: str, advisories: tuple[str, ...]) -> Claims:
        body = report.get("SgxEnclave")
        if body is None:
            raise AttestationError(
                f"SGX quote carries a {', '.join(report)} report, not an enclave report"
            )
        attributes = bytes.fromhex(body["attributes"])
        return Claims(
            evidence_type=SGX_DCAP,
            measurement=body["mr_enclave"],
            report_data=bytes.fromhex(body["report_data"]),
            debug=bool(attributes[0] & SGX_DEBUG_FLAG),
            tcb_status=status,
            advisories=advisories,
            details={
                "mrenclave": body["mr_enclave"],
                "mrsigner": body["mr_signer"],
                "isv_prod_id": int(body["isv_prod_id"]),
                "isv_svn": int(body["isv_svn"]),
                "attributes": body["attributes"],
                "cpu_svn": body["cpu_svn"],
                "misc_select": int(body["misc_select"]),
            },
        )


class TdxVerifier(_DcapVerifier):
    """TDX quotes, versions 4 and 5 (TD report 1.0 and 1.5)."""

    evidence_type = TDX
    tee_type = TEE_TYPE_TDX
    versions = TDX_QUOTE_VERSIONS

    def _claims(self, report: dict[str, Any], status: str, advisories: tuple[str, ...]) -> Claims:
        kinds = [kind for kind in report if kind.startswith("TD")]
        if len(kinds) != 1:
            raise AttestationError(
                f"TDX quote carries a {', '.join(report)} report, not a TD report"
            )
        body = report[kinds[0]]
        td_attributes = bytes.fromhex(body["td_attributes"])
        details: dict[str, Any] = {
            "td_report": kinds[0],
            "mrtd": body["mr_td"],
            "rtmrs": [body[f"rt_mr{index}"] for index in range(4)],
            "mrseam": body["mr_seam"],
            "mrsignerseam": body["mr_signer_seam"],
            "mrconfigid": body["mr_config_id"],
            "mrowner": body["mr_owner"],
            "mrownerconfig": body["mr_owner_config"],
            "td_attributes": body["td_attributes"],
            "xfam": body["xfam"],
            "tee_tcb_svn": body["tee_tcb_svn"],
        }
        if "mr_service_td" in body:
            details["mrservicetd"] = body["mr_service_td"]
        return Claims(
            evidence_type=TDX,
            measurement=body["mr_td"],
            report_data=bytes.fromhex(body["report_data"]),
            debug=bool(td_attributes[0] & TDX_DEBUG_FLAG),
            tcb_status=status,
            advisories=advisories,
            details=details,
        )


def _dcap_qvl() -> Any:
    try:
        import dcap_qvl  # noqa: PLC0415 -- optional: only SGX and TDX verification needs it
    except ImportError as error:
        raise AttestationError(
            "SGX and TDX quotes need the dcap-qvl package (pip install 'enclavify[hardware]')"
        ) from error
    return dcap_qvl
