"""Converting a real image: result file, leak scan, config, running it with podman, inspect."""

from __future__ import annotations

import hashlib
import json
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from enclavify.cli import main as cli_main
from enclavify.convert import ConversionResult, ConvertOptions, convert_image, inspect_image
from enclavify.convert.options import is_within
from enclavify.image import ImageBuilder, MergedFilesystem, open_image

from . import leakscan
from .conftest import APP_TOKEN, MESSAGE, run

pytestmark = [pytest.mark.podman, pytest.mark.slow]

REGIONS = ("/app", "/usr/lib/python3.11")


@dataclass
class Converted:
    source: str
    layout: Path
    reference: str
    result: ConversionResult
    result_path: Path
    scratch: Path


@pytest.fixture(scope="module")
def converted(app_image: str, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    directory = tmp_path_factory.mktemp("converted")
    scratch = directory / "scratch"
    scratch.mkdir()
    layout = directory / "layout"
    reference = f"oci:{layout}:conf"
    result = convert_image(
        ConvertOptions(
            source=app_image,
            destination=reference,
            binary="/usr/bin/python3",
            protected=REGIONS,
            result_path=directory / "result.json",
            temp_dir=scratch,
        )
    )
    return Converted(app_image, layout, reference, result, directory / "result.json", scratch)


def read_files(files: MergedFilesystem, top: str) -> Iterator[tuple[str, bytes]]:
    for entry in files.walk(top):
        if entry.type == "file":
            yield entry.path, files.read_bytes(entry.path)


def test_result_file_is_private_and_complete(converted: Converted) -> None:
    mode = stat.S_IMODE(converted.result_path.stat().st_mode)
    assert mode == 0o600
    document = json.loads(converted.result_path.read_text())
    assert document["image"] == converted.reference
    assert document["service"] == {
        "command": ["python3", "/app/main.py"],
        "environment": {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "APP_TOKEN": APP_TOKEN,
        },
        "pwd": "/app",
    }
    assert document["fspf_path"] == "/.enclavify/fspf"
    assert len(bytes.fromhex(document["fspf_key"])) == 32
    assert len(bytes.fromhex(document["fspf_tag"])) == 16
    assert document["measurement"] == converted.result.measurement
    assert document["protected"] == list(REGIONS)
    assert document["plain"] == []
    assert document["exposed_ports"] == ["8080/tcp"]
    assert document["runtime"]["interpreter"]["source"] == "the image itself"
    assert document["runtime"]["interpreter"]["path"] == "/usr/bin/python3.11"


def test_scratch_directory_is_removed(converted: Converted) -> None:
    assert list(converted.scratch.iterdir()) == []


def test_key_is_not_in_repr(converted: Converted) -> None:
    assert converted.result.fspf_key.hex() not in repr(converted.result)


def test_no_protected_plaintext_in_any_blob(
    converted: Converted, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("scan")
    with (
        open_image(converted.source, workdir=work / "source") as source,
        open_image(converted.reference, workdir=work / "output") as output,
    ):
        source_files = source.filesystem()
        runtime = dict(read_files(output.filesystem(), "/opt/enclavify"))
        # The runtime's own interpreter pieces are copies of protected files by design.
        carried = {hashlib.sha256(content).hexdigest() for content in runtime.values()}
        protected = [item for region in REGIONS for item in read_files(source_files, region)]
        index = leakscan.ProtectedIndex.build(protected, carried)
        clear = (
            content
            for path, content in read_files(source_files, "/")
            if not any(is_within(path, region) for region in REGIONS)
        )
        background = leakscan.background_windows([*clear, *runtime.values()])

    report = leakscan.scan(leakscan.layout_blobs(converted.layout), index, background)
    manifest = json.loads(run("skopeo", "inspect", "--raw", converted.reference).stdout)
    assert report.layers == len({layer["digest"] for layer in manifest["layers"]})
    assert index.files > 1000, report.summary()
    assert "/usr/lib/python3.11/os.py" in index.excluded, report.summary()
    assert "/app/data/message.txt" not in index.excluded
    assert report.leaks == {}, report.summary()

    # The same scan over the native image finds every protected file it can see.
    native = work / "native"
    run("skopeo", "copy", "-q", f"containers-storage:{converted.source}", f"oci:{native}:n")
    control = leakscan.scan(leakscan.layout_blobs(native), index, background)
    assert "/app/data/message.txt" in control.leaks, control.summary()
    assert "/app/data/random.bin" in control.leaks, control.summary()
    assert len(control.leaks) > 0.9 * index.files, control.summary()


def test_config_and_history_carry_nothing_native(converted: Converted) -> None:
    inspected = run("skopeo", "inspect", "--config", converted.reference).stdout
    config = json.loads(inspected)
    assert APP_TOKEN not in inspected
    assert "/app/main.py" not in inspected
    assert config["config"]["Env"] == [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    ]
    assert config["config"]["User"] == "0:0"
    assert config["config"]["WorkingDir"] == "/"
    assert "Cmd" not in config["config"]
    assert config["config"]["Entrypoint"] == converted.result.runtime["entrypoint"]
    assert config["config"]["ExposedPorts"] == {"8080/tcp": {}}
    labels = config["config"]["Labels"]
    assert labels["org.example.team"] == "records"
    assert labels["org.enclavify.measurement"] == converted.result.measurement
    assert json.loads(labels["org.enclavify.protected"]) == list(REGIONS)
    created_by = [entry.get("created_by", "") for entry in config["history"]]
    assert all(text.startswith("enclavify: ") for text in created_by), created_by
    # Three native layers (the base, COPY, RUN) and the two added ones.
    assert len(config["rootfs"]["diff_ids"]) == 5


def test_skopeo_reads_the_output(converted: Converted) -> None:
    manifest = json.loads(run("skopeo", "inspect", "--raw", converted.reference).stdout)
    assert len(manifest["layers"]) == 5
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    # Written to an OCI layout, the layers the conversion writes are plain tars, so each
    # blob digest is its diff_id: the rewritten base layer (first), the ciphertext (fourth)
    # and the runtime (fifth).
    media_types = [layer["mediaType"] for layer in manifest["layers"]]
    config = json.loads(run("skopeo", "inspect", "--config", "--raw", converted.reference).stdout)
    for number in (0, 3, 4):
        assert media_types[number] == "application/vnd.oci.image.layer.v1.tar", media_types
        assert manifest["layers"][number]["digest"] == config["rootfs"]["diff_ids"][number]


def test_inspect_reports_confidential_parts(converted: Converted, tmp_path: Path) -> None:
    inspection = inspect_image(converted.reference, temp_dir=tmp_path)
    assert inspection.confidential
    assert inspection.regions == list(REGIONS)
    assert inspection.measurement == converted.result.measurement
    assert inspection.measurement_recomputed == converted.result.measurement
    assert inspection.interpreter["source"] == "the image itself"
    assert inspection.problems == []
    assert inspection.protected_bytes > 1 << 20


def test_inspect_cli_says_native_image_is_not_confidential(
    app_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["image", "inspect", app_image]) == 0
    assert "not a confidential image" in capsys.readouterr().out
    assert cli_main(["image", "inspect", "--json", app_image]) == 0
    assert json.loads(capsys.readouterr().out)["confidential"] is False


def test_inspect_cli_json_of_confidential_image(
    converted: Converted, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["image", "inspect", "--json", converted.reference]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["confidential"] is True
    assert document["measurement_matches"] is True
    assert document["protected"] == list(REGIONS)


def test_inspect_cli_text_of_confidential_image(
    converted: Converted, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["image", "inspect", converted.reference]) == 0
    text = capsys.readouterr().out

    assert "confidential image" in text
    # Only the pack's total shows; the file count and sizes are inside the encrypted fspf.
    assert re.search(r"encrypted data: [0-9.]+ MiB", text)
    assert "heap 1.0 GiB (1073741824 bytes), stack 4.0 MiB (4194304 bytes)" in text


def podman_run(
    podman: str, image: str, result_path: Path, regions: tuple[str, ...], *extra: str
) -> subprocess.CompletedProcess[str]:
    argv = [
        podman, "run", "--rm", "--network=none",
        "-e", "ENCLAVIFY_INSECURE_CONFIG_FILE=/run/enclavify-config.json",
        "-v", f"{result_path}:/run/enclavify-config.json:ro",
    ]
    for region in regions:
        argv += ["--tmpfs", region]
    return subprocess.run(
        [*argv, *extra, image], capture_output=True, text=True, timeout=300, check=False
    )


def test_converted_app_runs_from_decrypted_files(
    podman: str, app_image: str, app_random: bytes, tmp_path: Path
) -> None:
    # An engine name with '/' and ':' as the destination, loaded straight into podman.
    target = "localhost/enclavify-test/app-confidential:v1"
    result_path = tmp_path / "result.json"
    convert_image(
        ConvertOptions(
            source=app_image,
            destination=target,
            binary="/usr/bin/python3",
            protected=REGIONS,
            result_path=result_path,
        )
    )
    process = podman_run(podman, target, result_path, REGIONS)
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert process.stdout.startswith(MESSAGE)
    assert f"random {hashlib.sha256(app_random).hexdigest()}" in lines
    assert f"token {APP_TOKEN}" in lines
    assert "cwd /app" in lines
    assert "uid 1234" in lines
    assert "INSECURE" in process.stderr

    # Without the key the launcher cannot decrypt: a forged key is rejected, nothing runs.
    forged = json.loads(result_path.read_text())
    forged["fspf_key"] = "11" * 32
    forged_path = tmp_path / "forged.json"
    forged_path.write_text(json.dumps(forged))
    refused = podman_run(podman, target, forged_path, REGIONS)
    assert refused.returncode != 0
    assert MESSAGE not in refused.stdout


def test_inspect_detects_changed_runtime_settings(converted: Converted, tmp_path: Path) -> None:
    tampered = f"oci:{tmp_path}/tampered:1"
    with open_image(converted.reference, workdir=tmp_path / "work") as image:
        settings = json.loads(image.filesystem().read_bytes("/opt/enclavify/runtime.json"))
        settings["heap"] = settings["heap"] * 2
        builder = ImageBuilder(image)
        for layer in image.layers:
            builder.copy_layer(layer)
        builder.add_layer(
            lambda writer: writer.add_bytes(
                "/opt/enclavify/runtime.json", json.dumps(settings).encode()
            ),
            created_by="test: a changed heap setting",
        )
        builder.commit(tampered)

    inspection = inspect_image(tampered, temp_dir=tmp_path)
    assert inspection.confidential
    assert inspection.measurement == converted.result.measurement
    assert inspection.measurement_recomputed != converted.result.measurement
    assert any("differs from the measurement" in problem for problem in inspection.problems)
    assert cli_main(["image", "inspect", tampered]) == 1
