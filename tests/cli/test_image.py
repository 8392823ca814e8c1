"""``enclavify image convert|inspect`` as a user runs them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from enclavify.cli import main
from tests.convert.conftest import app_image, app_random

# Fixtures shared with the conversion tests.
__all__ = ["app_image", "app_random"]


def test_convert_without_dir_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["image", "convert", "--from", "oci:/nonexistent:1", "--to", f"oci:{tmp_path}/o",
                 "--binary", "/usr/bin/python3"])
    assert code == 2
    assert "no --dir given" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--heap", "1T", "--heap '1T' is not a size"),
        ("--heap", "1M", "--heap '1M' is out of range"),
        ("--stack", "16M", "--stack '16M' is out of range"),
    ],
)
def test_convert_rejects_bad_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    code = main(["image", "convert", "--from", "oci:/nonexistent:1", "--to", f"oci:{tmp_path}/o",
                 "--binary", "/usr/bin/python3", "--dir", "/app", flag, value])
    assert code == 2
    assert message in capsys.readouterr().err


def test_convert_rejects_unreadable_cas_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["image", "convert", "--from", "oci:/nonexistent:1", "--to", f"oci:{tmp_path}/o",
                 "--binary", "/usr/bin/python3", "--dir", "/app",
                 "--cas-cert", str(tmp_path / "missing.pem")])
    assert code == 2
    assert "cannot be read" in capsys.readouterr().err


def test_convert_of_missing_source_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["image", "convert", "--from", f"oci:{tmp_path}/missing:1",
                 "--to", f"oci:{tmp_path}/o:1", "--binary", "/usr/bin/python3", "--dir", "/app",
                 "--result", str(tmp_path / "r.json")])
    assert code == 1
    assert "enclavify: error: OCI layout" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.podman
@pytest.mark.slow
def test_convert_command_line(app_image: str, tmp_path: Path) -> None:
    environment = dict(os.environ)
    result_name = "localhost_enclavify-test_cli_v1.enclavify.json"
    process = subprocess.run(
        [sys.executable, "-m", "enclavify", "image", "convert",
         "--from", app_image, "--to", "localhost/enclavify-test/cli:v1",
         "--dir", "/app", "--binary", "/usr/bin/python3",
         "--heap", "512M", "--stack", "1M", "--dlopen", "0",
         "--cas", "localhost:8081", "--config-id", "ns/flask/service"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600, check=False,
    )
    assert process.returncode == 0, process.stderr
    digest = process.stdout.strip()
    assert digest.startswith("sha256:")
    assert len(digest) == 71
    # Not a terminal: plain progress lines, no bar drawing.
    assert "Encrypting protected files" in process.stderr
    assert "\r" not in process.stderr
    result_path = tmp_path / result_name
    assert stat.S_IMODE(result_path.stat().st_mode) == 0o600
    document = json.loads(result_path.read_text())
    assert document["fspf_key"] not in process.stdout + process.stderr
    assert document["runtime"]["interpreter"]["source"] == "the image itself"

    inspected = subprocess.run(
        [sys.executable, "-m", "enclavify", "image", "inspect", "--json",
         "localhost/enclavify-test/cli:v1"],
        env=environment, capture_output=True, text=True, timeout=300, check=False,
    )
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["confidential"] is True
    assert report["heap"] == 512 << 20
    assert report["stack"] == 1 << 20
    assert report["dlopen"] == 0
    assert report["cas_address"] == "localhost:8081"
    assert report["config_id"] == "ns/flask/service"
    assert report["measurement"] == document["measurement"]
    assert report["measurement_matches"] is True
    subprocess.run(["podman", "rmi", "localhost/enclavify-test/cli:v1"], capture_output=True,
                   check=False)


@pytest.mark.podman
@pytest.mark.slow
def test_convert_quiet_prints_only_the_digest(app_image: str, tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "enclavify", "image", "convert", "-q",
         "--from", app_image, "--to", f"oci:{tmp_path}/layout:q",
         "--dir", "/app", "--binary", "/usr/bin/python3", "--result", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith("sha256:")
    assert "Encrypting" not in process.stderr
    assert "measurement" not in process.stderr
