"""Bad requests are rejected before anything is written; a failure mid-run leaves nothing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclavify.convert import ConvertOptions, convert_image, inspect_image
from enclavify.errors import Error, ImageError, UsageError
from enclavify.image import open_image
from enclavify.protect import Sealer

from .test_options import self_signed_pem

pytestmark = [pytest.mark.podman, pytest.mark.slow]


def options(source: str, tmp_path: Path, **changes: Any) -> ConvertOptions:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "source": source,
        "destination": f"oci:{tmp_path / 'out'}:1",
        "binary": "/usr/bin/python3",
        "protected": ("/app",),
        "result_path": tmp_path / "result.json",
        "temp_dir": scratch,
    }
    values.update(changes)
    return ConvertOptions(**values)


def assert_nothing_left(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "result.json").exists()
    assert list((tmp_path / "scratch").iterdir()) == []
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("scratch",)]
    assert leftovers == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"protected": ("/srv/missing",)}, "--dir '/srv/missing' does not exist in the image"),
        ({"protected": ("/app/main.py",)}, "is not a directory in the image"),
        # Debian's /lib is a symbolic link to usr/lib.
        (
            {"protected": ("/lib/python3.11",)},
            "goes through a symbolic link to '/usr/lib/python3.11'",
        ),
        ({"plain": ("/nowhere",)}, "--plain '/nowhere' does not exist in the image"),
        ({"binary": "/usr/bin/python9"}, "--binary '/usr/bin/python9' does not exist"),
        ({"binary": "/app"}, "is not a regular file"),
    ],
)
def test_bad_request_is_rejected_before_writing(
    app_image: str, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        convert_image(options(app_image, tmp_path, **changes))
    assert_nothing_left(tmp_path)


def test_image_without_python_needs_base(
    nopython_image: str, python_base_image: str, tmp_path: Path
) -> None:
    with pytest.raises(ImageError, match="pass --base IMAGE"):
        convert_image(options(nopython_image, tmp_path, binary="/app/tool"))
    assert_nothing_left(tmp_path)

    result = convert_image(
        options(nopython_image, tmp_path, binary="/app/tool", base=python_base_image)
    )
    assert result.runtime["interpreter"]["source"] == f"base image {python_base_image}"
    inspection = inspect_image(result.image, temp_dir=tmp_path / "scratch")
    assert inspection.interpreter["source"] == f"base image {python_base_image}"
    assert inspection.measurement_recomputed == result.measurement


def test_confidential_image_is_not_converted_again(app_image: str, tmp_path: Path) -> None:
    first = convert_image(options(app_image, tmp_path))
    second_dir = tmp_path / "again"
    second_dir.mkdir()
    with pytest.raises(UsageError, match=r"already contains /\.enclavify/fspf"):
        convert_image(options(first.image, second_dir))
    assert_nothing_left(second_dir)


def test_failure_while_sealing_leaves_nothing(
    app_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_seal_file = Sealer.seal_file
    calls = {"count": 0}

    def failing_seal_file(self: Sealer, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("injected failure while sealing")
        return real_seal_file(self, *args, **kwargs)

    monkeypatch.setattr(Sealer, "seal_file", failing_seal_file)
    with pytest.raises(RuntimeError, match="injected failure"):
        convert_image(options(app_image, tmp_path))
    assert calls["count"] == 3
    assert_nothing_left(tmp_path)


def test_failure_before_commit_leaves_nothing(
    app_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_compute(**kwargs: Any) -> str:
        raise RuntimeError("injected failure while measuring")

    monkeypatch.setattr("enclavify.convert.pipeline.measurement.compute", failing_compute)
    with pytest.raises(RuntimeError, match="injected failure"):
        convert_image(options(app_image, tmp_path))
    assert_nothing_left(tmp_path)


def test_failed_commit_leaves_no_result_file(app_image: str, tmp_path: Path) -> None:
    # Nothing listens on port 9 of the loopback address, so the push fails.
    with pytest.raises(Error):
        convert_image(options(app_image, tmp_path, destination="docker://127.0.0.1:9/x/y:1"))
    assert_nothing_left(tmp_path)


def test_plain_directories_are_recorded(app_image: str, tmp_path: Path) -> None:
    result = convert_image(
        options(app_image, tmp_path, protected=("/app",), plain=("/usr/share",))
    )
    assert result.plain == ("/usr/share",)
    document = json.loads((tmp_path / "result.json").read_text())
    assert document["plain"] == ["/usr/share"]
    inspection = inspect_image(result.image, temp_dir=tmp_path / "scratch")
    assert inspection.plain == ["/usr/share"]


def test_cas_certificate_is_pinned_in_runtime(app_image: str, tmp_path: Path) -> None:
    pem = self_signed_pem()
    result = convert_image(
        options(
            app_image,
            tmp_path,
            cas_certificate=pem,
            cas_address="cas.example:8081",
            config_id="ns/flask/service",
        )
    )
    with open_image(result.image, workdir=tmp_path / "scratch") as image:
        files = image.filesystem()
        assert files.read_bytes("/opt/enclavify/cas-ca.pem") == pem
        settings = json.loads(files.read_bytes("/opt/enclavify/runtime.json"))
    fingerprint = hashlib.sha256(
        x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    ).hexdigest()
    assert settings["cas_certificate"] == "/opt/enclavify/cas-ca.pem"
    assert settings["cas_fingerprint"] == fingerprint
    assert settings["cas_address"] == "cas.example:8081"
    assert settings["config_id"] == "ns/flask/service"
    inspection = inspect_image(result.image, temp_dir=tmp_path / "scratch")
    assert inspection.cas_fingerprint == fingerprint
    assert inspection.measurement_recomputed == result.measurement
