"""`enclavify evidence verify` on real samples and rejected evidence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from enclavify.attest import report_data
from enclavify.cli import main
from tests.attest.samples import sample


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["evidence", "verify", *argv])
    output = capsys.readouterr()
    return code, output.out, output.err


def test_sgx_quote_claims_printed(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("dcap_qvl", reason="SGX verification needs the dcap-qvl package")
    quote = sample("dcap-qvl/sgx_quote")
    collateral = sample("dcap-qvl/sgx_quote_collateral.json")
    code, out, _ = run(
        capsys, str(quote), "--collateral", str(collateral), "--at", "2025-07-01T00:00:00Z"
    )
    assert code == 0
    claims = json.loads(out)
    assert claims["evidence_type"] == "sgx-dcap"
    assert (
        claims["measurement"] == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    )
    assert claims["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert claims["advisories"] == ["INTEL-SA-00289", "INTEL-SA-00615"]


def test_tdx_quote_type_detected(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("dcap_qvl", reason="TDX verification needs the dcap-qvl package")
    quote = sample("dcap-qvl/tdx_quote")
    collateral = sample("dcap-qvl/tdx_quote_collateral.json")
    code, out, _ = run(capsys, str(quote), "--collateral", str(collateral), "--at", "2025-07-01")
    assert code == 0
    assert json.loads(out)["evidence_type"] == "tdx"


def test_expired_collateral_rejected_with_reason(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("dcap_qvl", reason="SGX verification needs the dcap-qvl package")
    quote = sample("dcap-qvl/sgx_quote")
    collateral = sample("dcap-qvl/sgx_quote_collateral.json")
    code, out, err = run(capsys, str(quote), "--collateral", str(collateral), "--at", "2025-09-01")
    assert code == 1
    assert out == ""
    assert "sgx-dcap quote rejected" in err
    assert "expired" in err.lower()


def test_snp_configfs_json_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    path = sample("veraison/sevsnp-tsm-report.json")
    code, out, _ = run(capsys, str(path), "--at", "2026-01-01T00:00:00+00:00")
    assert code == 0
    claims = json.loads(out)
    assert claims["evidence_type"] == "sev-snp"
    assert claims["details"]["product"] == "Genoa"


def test_simulation_evidence_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bound = report_data.bind(b"n", b"k")
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps({"measurement": "ab" * 32, "report_data": bound.hex()}))
    code, out, _ = run(capsys, str(path))
    assert code == 0
    assert json.loads(out)["report_data"] == bound.hex()
    assert json.loads(out)["tcb_status"] == "Simulation"


def test_unknown_form_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evidence.bin"
    path.write_bytes(b"\x00" * 10)
    code, _, err = run(capsys, str(path))
    assert code == 2
    assert "cannot tell the evidence type" in err
    assert str(path) in err
    assert "--type" in err


def test_missing_file_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, str(tmp_path / "absent"))
    assert code == 2
    assert "cannot read evidence" in err


def test_bad_time_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evidence.json"
    path.write_text("{}")
    code, _, err = run(capsys, str(path), "--at", "yesterday")
    assert code == 2
    assert "not an ISO 8601 time" in err
