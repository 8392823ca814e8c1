"""Detection of the TEE devices a guest or host exposes.

This module is carried into confidential images: standard library and Python 3.8 syntax only.
"""

from __future__ import annotations

import os

from enclavify.values import Value

SGX = "sgx"
TDX = "tdx"
SEV_SNP = "sev-snp"
CONFIGFS_TSM = "configfs-tsm"

# In-kernel SGX driver paths first (Linux 5.11 and later), then the older out-of-tree ones.
SGX_PATHS = ("/dev/sgx_enclave", "/dev/sgx/enclave", "/dev/sgx", "/dev/isgx")
TDX_PATHS = ("/dev/tdx_guest",)
SEV_SNP_PATHS = ("/dev/sev-guest",)
CONFIGFS_TSM_PATH = "/sys/kernel/config/tsm/report"
GRAMINE_ATTESTATION_PATH = "/dev/attestation"


class Device(Value):
    """A TEE interface found on this machine; ``path`` is as seen from ``/``."""

    __slots__ = ("kind", "path")

    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind
        self.path = path


def detect(root: str = "/") -> list[Device]:
    """Return the TEE devices present under ``root``, SGX first, in a stable order.

    ``root`` lets tests point the detection at a fake tree. Gramine's ``/dev/attestation``
    is reported as an SGX device because it produces SGX quotes.
    """
    found: list[Device] = []
    for path in SGX_PATHS:
        if _exists(root, path):
            found.append(Device(SGX, path))
    if _exists(root, GRAMINE_ATTESTATION_PATH):
        found.append(Device(SGX, GRAMINE_ATTESTATION_PATH))
    for path in TDX_PATHS:
        if _exists(root, path):
            found.append(Device(TDX, path))
    for path in SEV_SNP_PATHS:
        if _exists(root, path):
            found.append(Device(SEV_SNP, path))
    if os.path.isdir(_under(root, CONFIGFS_TSM_PATH)):
        found.append(Device(CONFIGFS_TSM, CONFIGFS_TSM_PATH))
    return found


def sgx_device(root: str = "/") -> Device | None:
    """Return the SGX enclave device to pass to a container, or None when there is none."""
    for device in detect(root):
        if device.kind == SGX and device.path != GRAMINE_ATTESTATION_PATH:
            return device
    return None


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _exists(root: str, path: str) -> bool:
    return os.path.exists(_under(root, path))
