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
from collections.abc import Mapping
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

# The reason dcap-qvl (0.3.9 and later) gives when a quote's platform TCB matches no level of
# the TCB info. Intel's QVL returns STATUS_TCB_NOT_SUPPORTED in that case.
NO_TCB_LEVEL_REASON = "No matching TCB level found"

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
            reason = str(error)
            if NO_TCB_LEVEL_REASON in reason:
                explanation = _explain_unmatched_tcb(dcap_qvl, data, collateral.dcap)
                if explanation is not None:
                    reason = f"{explanation} (dcap-qvl: {NO_TCB_LEVEL_REASON})"
            raise AttestationError(f"{self.evidence_type} quote rejected: {reason}") from error

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


def _explain_unmatched_tcb(dcap_qvl: Any, data: bytes, dcap: Mapping[str, Any]) -> str | None:
    """Describe which SVNs of the quote fall short of the lowest level in its TCB info.

    Intel's QVL (``TcbLevelCheck``) takes the first level whose 16 SGX TCB component SVNs and
    PCE SVN are each at or below the PCK certificate's. For TDX, each TEE TCB SVN of the TD
    report must also be at least the level's ``tdxtcbcomponents`` entry. That comparison
    starts at index 2 when TEE_TCB_SVN[1] is nonzero, because indexes 0 and 1 then are the TDX
    module's SVN and major version, which are judged against ``tdxModuleIdentities`` instead.
    Intel lists levels from highest to lowest, so the last one is the lowest. Returns None
    when the quote or TCB info cannot be read this way or shows no shortfall against that
    level, so dcap-qvl's own reason stands.
    """
    try:
        quote = dcap_qvl.parse_quote(data)
        tcb_info = json.loads(dcap["tcb_info"])
    except (ValueError, TypeError, KeyError):
        return None
    pck = quote.pck_extension()
    levels = tcb_info.get("tcbLevels") if isinstance(tcb_info, dict) else None
    if pck is None or not isinstance(levels, list) or not levels:
        return None
    lowest = levels[-1]
    tcb = lowest.get("tcb") if isinstance(lowest, dict) else None
    if not isinstance(tcb, dict):
        return None

    shortfalls = []
    sgx_needed = _component_svns(tcb, "sgxtcbcomponents", "sgxtcbcomp{:02d}svn")
    if sgx_needed is None:
        return None
    for index, (have, needed) in enumerate(zip(pck.cpu_svn, sgx_needed, strict=False)):
        if have < needed:
            shortfalls.append(
                f"SGX TCB component {index + 1} >= {needed} where the PCK certificate has {have}"
            )
    pce_needed = tcb.get("pcesvn")
    if isinstance(pce_needed, int) and pck.pce_svn < pce_needed:
        shortfalls.append(f"PCE SVN >= {pce_needed} where the PCK certificate has {pck.pce_svn}")
    tee_tcb_svn = getattr(quote.report, "tee_tcb_svn", None)
    tdx_needed = _component_svns(tcb, "tdxtcbcomponents", None)
    if isinstance(tee_tcb_svn, bytes) and tdx_needed is not None:
        start = 2 if len(tee_tcb_svn) > 1 and tee_tcb_svn[1] > 0 else 0
        for index in range(start, min(len(tee_tcb_svn), len(tdx_needed))):
            if tee_tcb_svn[index] < tdx_needed[index]:
                shortfalls.append(
                    f"TEE TCB SVN[{index}] >= {tdx_needed[index]}"
                    f" where the TD report has {tee_tcb_svn[index]}"
                )
    if not shortfalls:
        return None
    return (
        f"its platform TCB matches none of the {len(levels)} TCB levels listed for FMSPC"
        f" {tcb_info.get('fmspc')} (TCB evaluation data number"
        f" {tcb_info.get('tcbEvaluationDataNumber')}), because even the lowest level"
        f" (tcbDate {lowest.get('tcbDate')}, {lowest.get('tcbStatus')}) needs"
        f" {', '.join(shortfalls)}"
    )


def _component_svns(
    tcb: Mapping[str, Any], list_key: str, flat_key: str | None
) -> list[int] | None:
    """Return a TCB level's component SVNs from TCB info version 3 lists or version 2 keys."""
    components = tcb.get(list_key)
    if isinstance(components, list):
        svns = [component.get("svn") for component in components if isinstance(component, dict)]
    elif flat_key is not None:
        svns = [tcb.get(flat_key.format(number)) for number in range(1, 17)]
    else:
        return None
    numbers = [svn for svn in svns if isinstance(svn, int)]
    return numbers if len(numbers) == len(svns) == 16 else None


def _dcap_qvl() -> Any:
    try:
        import dcap_qvl  # noqa: PLC0415 -- optional: only SGX and TDX verification needs it
    except ImportError as error:
        raise AttestationError(
            "SGX and TDX quotes need the dcap-qvl package (pip install 'enclavify[hardware]')"
        ) from error
    return dcap_qvl
