"""`enclavify device` and `determine_sgx_device` against fake device trees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from enclavify.cli import main
from enclavify.cli.device import determine_sgx_device_main


def fake_root(tmp_path: Path, *devices: str) -> Path:
    for device in devices:
        path = tmp_path / device.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return tmp_path


def test_device_lists_found_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fake_root(tmp_path, "/dev/sgx_enclave", "/dev/tdx_guest")
    assert main(["device", "--root", str(root)]) == 0
    assert capsys.readouterr().out == "sgx\t/dev/sgx_enclave\ntdx\t/dev/tdx_guest\n"


def test_device_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fake_root(tmp_path, "/dev/sev-guest")
    assert main(["device", "--json", "--root", str(root)]) == 0
    assert json.loads(capsys.readouterr().out) == [{"kind": "sev-snp", "path": "/dev/sev-guest"}]


def test_device_none_says_simulation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["device", "--json", "--root", str(tmp_path)]) == 0
    output = capsys.readouterr()
    assert json.loads(output.out) == []
    assert "only simulation mode is possible" in output.err


def test_determine_sgx_device_prints_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fake_root(tmp_path, "/dev/isgx")
    assert determine_sgx_device_main(["--root", str(root)]) == 0
    output = capsys.readouterr()
    assert output.out == "/dev/isgx\n"
    assert output.err == ""


def test_determine_sgx_device_prints_nothing_without_sgx(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fake_root(tmp_path, "/dev/tdx_guest")
    assert determine_sgx_device_main(["--root", str(root)]) == 0
    output = capsys.readouterr()
    assert output.out == ""
    assert "only simulation mode is possible" in output.err


def test_determine_sgx_device_console_script() -> None:
    script = Path(sys.executable).parent / "determine_sgx_device"
    if not script.exists():
        pytest.skip("the determine_sgx_device console script is not installed in this environment")
    result = subprocess.run([str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    has_sgx = any(
        Path(path).exists()
        for path in ("/dev/sgx_enclave", "/dev/sgx/enclave", "/dev/sgx", "/dev/isgx")
    )
    assert bool(result.stdout) == has_sgx
    assert bool(result.stderr) != has_sgx
