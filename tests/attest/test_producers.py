"""Evidence production: devices, configfs-tsm against a fake kernel tree, Gramine, simulation."""

from __future__ import annotations

import base64
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from enclavify.attest import configfs_tsm, devices, report_data
from enclavify.attest.producers import produce_evidence
from enclavify.attest.verify import check_report_data, verify_evidence
from enclavify.errors import AttestationError, LaunchError

from .samples import sample

REPORT_DATA = report_data.bind(b"n" * 32, b"k" * 32)
MEASUREMENT = "cd" * 32
TSM = "sys/kernel/config/tsm/report"


def b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeKernel(configfs_tsm.ConfigfsFiles):
    """A configfs-tsm stand-in on a temporary directory, behaving as the kernel does.

    mkdir of an entry creates its attribute files with generation 0; each write to inblob
    bumps the generation. ``concurrent_writes`` more writes from another process land
    between the reader's write and its read of outblob.
    """

    def __init__(
        self, provider: str, outblob: bytes, auxblob: bytes | None, concurrent_writes: int = 0
    ) -> None:
        self.provider = provider
        self.outblob = outblob
        self.auxblob = auxblob
        self.concurrent_writes = concurrent_writes
        self.inblobs: list[bytes] = []
        self.entries: list[str] = []

    def make_entry(self, base: str) -> str:
        entry = super().make_entry(base)
        self.entries.append(entry)
        Path(entry, "generation").write_text("0\n")
        Path(entry, "provider").write_text(self.provider + "\n")
        Path(entry, "outblob").write_bytes(self.outblob)
        if self.auxblob is not None:
            Path(entry, "auxblob").write_bytes(self.auxblob)
        return entry

    def remove_entry(self, entry: str) -> None:
        for name in os.listdir(entry):
            os.unlink(os.path.join(entry, name))
        super().remove_entry(entry)

    def write(self, path: str, data: bytes) -> None:
        super().write(path, data)
        if os.path.basename(path) == "inblob":
            self.inblobs.append(data)
            self._bump(os.path.dirname(path))

    def read(self, path: str) -> bytes:
        if os.path.basename(path) == "outblob" and self.concurrent_writes:
            self.concurrent_writes -= 1
            self._bump(os.path.dirname(path))
        return super().read(path)

    def _bump(self, entry: str) -> None:
        generation = Path(entry, "generation")
        generation.write_text(f"{int(generation.read_text()) + 1}\n")


def tsm_root(tmp_path: Path) -> Path:
    (tmp_path / TSM).mkdir(parents=True)
    return tmp_path


def snp_kernel(concurrent_writes: int = 0) -> FakeKernel:
    document = json.loads(sample("veraison/sevsnp-tsm-report.json").read_bytes())
    return FakeKernel(
        "sev_guest", b64(document["outblob"]), b64(document["auxblob"]), concurrent_writes
    )


# ---------------------------------------------------------------- devices


def test_detect_finds_nothing_on_empty_root(tmp_path: Path) -> None:
    assert devices.detect(str(tmp_path)) == []
    assert devices.sgx_device(str(tmp_path)) is None


def test_detect_lists_every_kind(tmp_path: Path) -> None:
    (tmp_path / "dev/sgx").mkdir(parents=True)
    for name in ("sgx_enclave", "isgx", "tdx_guest", "sev-guest"):
        (tmp_path / "dev" / name).touch()
    (tmp_path / TSM).mkdir(parents=True)
    assert devices.detect(str(tmp_path)) == [
        devices.Device("sgx", "/dev/sgx_enclave"),
        devices.Device("sgx", "/dev/sgx"),
        devices.Device("sgx", "/dev/isgx"),
        devices.Device("tdx", "/dev/tdx_guest"),
        devices.Device("sev-snp", "/dev/sev-guest"),
        devices.Device("configfs-tsm", "/sys/kernel/config/tsm/report"),
    ]
    assert devices.sgx_device(str(tmp_path)) == devices.Device("sgx", "/dev/sgx_enclave")


def test_sgx_device_prefers_in_kernel_driver(tmp_path: Path) -> None:
    (tmp_path / "dev/sgx").mkdir(parents=True)
    (tmp_path / "dev/sgx/enclave").touch()
    (tmp_path / "dev/isgx").touch()
    device = devices.sgx_device(str(tmp_path))
    assert device is not None
    assert device.path == "/dev/sgx/enclave"


# ---------------------------------------------------------------- configfs-tsm


def test_configfs_sev_snp_report_verifies(tmp_path: Path) -> None:
    kernel = snp_kernel()
    root = tsm_root(tmp_path)
    evidence_type, data = produce_evidence(
        REPORT_DATA, measurement=MEASUREMENT, allow_simulation=False, root=str(root), files=kernel
    )
    assert evidence_type == "sev-snp"
    assert kernel.inblobs == [REPORT_DATA]
    claims = verify_evidence(evidence_type, data, now=datetime(2026, 1, 1, tzinfo=UTC))
    assert claims.measurement == kernel.outblob[0x90:0xC0].hex()
    # The sample was made for other report data, so the binding check must fail.
    with pytest.raises(AttestationError, match="does not bind"):
        check_report_data(claims, b"n" * 32, b"k" * 32)


def test_configfs_entry_is_removed(tmp_path: Path) -> None:
    kernel = snp_kernel()
    root = tsm_root(tmp_path)
    configfs_tsm.read_report(REPORT_DATA, root=str(root), files=kernel)
    assert len(kernel.entries) == 1
    assert os.listdir(root / TSM) == []


def test_configfs_concurrent_writer_causes_retry(tmp_path: Path) -> None:
    kernel = snp_kernel(concurrent_writes=2)
    report = configfs_tsm.read_report(REPORT_DATA, root=str(tsm_root(tmp_path)), files=kernel)
    assert kernel.inblobs == [REPORT_DATA] * 3
    assert report.generation == 5
    assert report.provider == "sev_guest"
    assert report.auxblob == kernel.auxblob


def test_configfs_writer_racing_every_attempt_fails(tmp_path: Path) -> None:
    kernel = snp_kernel(concurrent_writes=100)
    with pytest.raises(configfs_tsm.TsmError, match="changed by another writer on all 3 attempts"):
        configfs_tsm.read_report(
            REPORT_DATA, root=str(tsm_root(tmp_path)), files=kernel, attempts=3
        )


def test_configfs_tdx_quote_is_passed_through(tmp_path: Path) -> None:
    quote = sample("dcap-qvl/tdx_quote").read_bytes()
    kernel = FakeKernel("tdx_guest", quote, None)
    evidence_type, data = produce_evidence(
        REPORT_DATA,
        measurement=MEASUREMENT,
        allow_simulation=False,
        root=str(tsm_root(tmp_path)),
        files=kernel,
    )
    assert (evidence_type, data) == ("tdx", quote)


def test_configfs_unknown_provider_is_rejected(tmp_path: Path) -> None:
    kernel = FakeKernel("arm_cca_guest", b"token", None)
    with pytest.raises(LaunchError, match="provider 'arm_cca_guest' is not supported"):
        produce_evidence(
            REPORT_DATA,
            measurement=MEASUREMENT,
            allow_simulation=True,
            root=str(tsm_root(tmp_path)),
            files=kernel,
        )


def test_configfs_missing_is_reported(tmp_path: Path) -> None:
    with pytest.raises(configfs_tsm.TsmError, match="not available"):
        configfs_tsm.read_report(REPORT_DATA, root=str(tmp_path))


def test_real_configfs_tsm_produces_evidence() -> None:
    if not os.path.isdir("/" + TSM):
        pytest.skip("this machine has no configfs-tsm (no TDX or SEV-SNP guest kernel)")
    evidence_type, data = produce_evidence(
        REPORT_DATA, measurement=MEASUREMENT, allow_simulation=False
    )
    assert evidence_type in ("tdx", "sev-snp")
    assert data


# ---------------------------------------------------------------- Gramine and simulation


def test_gramine_quote_is_read_after_report_data(tmp_path: Path) -> None:
    attestation = tmp_path / "dev/attestation"
    attestation.mkdir(parents=True)
    (attestation / "quote").write_bytes(b"quote bytes")
    evidence_type, data = produce_evidence(
        REPORT_DATA, measurement=MEASUREMENT, allow_simulation=False, root=str(tmp_path)
    )
    assert (evidence_type, data) == ("sgx-dcap", b"quote bytes")
    assert (attestation / "user_report_data").read_bytes() == REPORT_DATA


def test_simulation_is_produced_only_when_allowed(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="does not allow simulation"):
        produce_evidence(
            REPORT_DATA, measurement=MEASUREMENT, allow_simulation=False, root=str(tmp_path)
        )


def test_simulation_logs_warning_and_verifies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        evidence_type, data = produce_evidence(
            REPORT_DATA, measurement=MEASUREMENT, allow_simulation=True, root=str(tmp_path)
        )
        produce_evidence(
            REPORT_DATA, measurement=MEASUREMENT, allow_simulation=True, root=str(tmp_path)
        )
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "INSECURE" in warnings[0].getMessage()
    claims = verify_evidence(evidence_type, data, now=datetime(2026, 1, 1, tzinfo=UTC))
    assert claims.measurement == MEASUREMENT
    check_report_data(claims, b"n" * 32, b"k" * 32)


def test_device_without_interface_is_explained(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/sev-guest").touch()
    with pytest.raises(LaunchError, match="need Linux configfs-tsm"):
        produce_evidence(
            REPORT_DATA, measurement=MEASUREMENT, allow_simulation=False, root=str(tmp_path)
        )


def test_report_data_of_wrong_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="must be 64 bytes, got 3"):
        produce_evidence(b"abc", measurement=MEASUREMENT, allow_simulation=True, root=str(tmp_path))
