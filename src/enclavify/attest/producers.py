"""Evidence production inside a confidential image.

:func:`produce_evidence` picks the first interface :func:`devices.detect` finds: Linux
configfs-tsm (TDX or SEV-SNP guests), then Gramine's ``/dev/attestation`` (SGX), and only when
the caller allows it, simulation. Simulation evidence is the launcher's own claim about its
measurement with nothing vouching for it; a WARNING is logged every time it is produced.

This module is carried into confidential images: standard library and Python 3.8 syntax only.
"""

from __future__ import annotations

import os

from enclavify import b64, jsontext, logs
from enclavify.attest import configfs_tsm, devices
from enclavify.errors import LaunchError

log = logs.get_logger(__name__)

REPORT_DATA_SIZE = 64

# Evidence type names, as in enclavify.attest.claims (not imported: that module is not carried).
SIMULATION = "simulation"
SGX_DCAP = "sgx-dcap"
TDX = "tdx"
SEV_SNP = "sev-snp"

_PROVIDER_TYPES = {"tdx_guest": TDX, "sev_guest": SEV_SNP}


def produce_evidence(
    report_data: bytes,
    *,
    measurement: str,
    allow_simulation: bool,
    root: str = "/",
    files: configfs_tsm.ConfigfsFiles | None = None,
) -> tuple[str, bytes]:
    """Return (evidence type, evidence bytes) carrying ``report_data``.

    ``measurement`` is the launcher's own measurement, used only for simulation evidence.
    ``root`` and ``files`` let tests point the device lookup and configfs-tsm at a fake tree.

    Raises:
        LaunchError: the report data is not 64 bytes, the TEE interface failed, or there is no
            usable TEE interface and simulation is not allowed.
    """
    if len(report_data) != REPORT_DATA_SIZE:
        raise LaunchError(f"report data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    found = devices.detect(root)
    kinds = {device.kind for device in found}
    paths = {device.path for device in found}

    if devices.CONFIGFS_TSM in kinds:
        return from_configfs_tsm(report_data, root=root, files=files)
    if devices.GRAMINE_ATTESTATION_PATH in paths:
        return SGX_DCAP, from_gramine(report_data, root=root)
    if allow_simulation:
        if found:
            names = ", ".join(device.path for device in found)
            log.warning(
                "INSECURE: producing simulation evidence although TEE devices exist (%s) "
                "that enclavify cannot produce evidence from",
                names,
            )
        else:
            log.warning("INSECURE: no TEE found; producing simulation evidence that proves nothing")
        return SIMULATION, simulation_evidence(report_data, measurement)
    if found:
        names = ", ".join(device.path for device in found)
        raise LaunchError(
            f"found {names} but no evidence interface: TDX and SEV-SNP need Linux configfs-tsm "
            "(Linux 6.7 or later), SGX needs Gramine's /dev/attestation"
        )
    raise LaunchError("no TEE found and the session does not allow simulation mode")


def from_configfs_tsm(
    report_data: bytes, *, root: str = "/", files: configfs_tsm.ConfigfsFiles | None = None
) -> tuple[str, bytes]:
    """Read a TDX quote or an SEV-SNP report (with its certificate table) from configfs-tsm."""
    try:
        report = configfs_tsm.read_report(report_data, root=root, files=files)
    except configfs_tsm.TsmError as error:
        raise LaunchError(f"configfs-tsm report failed: {error}") from error
    evidence_type = _PROVIDER_TYPES.get(report.provider)
    if evidence_type is None:
        raise LaunchError(f"configfs-tsm provider {report.provider!r} is not supported")
    if evidence_type == TDX:
        return TDX, report.outblob
    document = {"provider": report.provider, "outblob": b64.encode_urlsafe_unpadded(report.outblob)}
    if report.auxblob:
        document["auxblob"] = b64.encode_urlsafe_unpadded(report.auxblob)
    return SEV_SNP, jsontext.dumps(document).encode()


def from_gramine(report_data: bytes, *, root: str = "/") -> bytes:
    """Return an SGX quote from Gramine's pseudo-files: write user_report_data, read quote."""
    base = os.path.join(root, devices.GRAMINE_ATTESTATION_PATH.lstrip("/"))
    try:
        with open(os.path.join(base, "user_report_data"), "wb") as stream:
            stream.write(report_data)
        with open(os.path.join(base, "quote"), "rb") as stream:
            return stream.read()
    except OSError as error:
        raise LaunchError(f"Gramine attestation under {base} failed: {error}") from error


def simulation_evidence(report_data: bytes, measurement: str) -> bytes:
    """Return simulation evidence: JSON with the launcher's measurement and report data."""
    document = {"measurement": measurement, "report_data": report_data.hex()}
    return jsontext.dumps(document).encode()
