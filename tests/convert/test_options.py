"""Conversion options, config rewriting, the result file and progress output, without images."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from enclavify import progress
from enclavify.convert import imageconfig
from enclavify.convert.options import (
    HEAP_RANGE,
    ConvertOptions,
    check_options,
    default_result_path,
    parse_size,
    safe_file_name,
)
from enclavify.convert.result import PendingResult
from enclavify.errors import UsageError
from enclavify.image import ImageConfig


def options(tmp_path: Path, **changes: object) -> ConvertOptions:
    values: dict[str, object] = {
        "source": "oci:/tmp/in:1",
        "destination": "oci:/tmp/out:1",
        "binary": "/usr/bin/python3",
        "protected": ("/app",),
        "result_path": tmp_path / "result.json",
    }
    values.update(changes)
    return ConvertOptions(**values)  # type: ignore[arg-type]


def self_signed_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cas")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(Encoding.PEM)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1G", 1 << 30), ("512m", 512 << 20), ("8M", 8 << 20), ("65536k", 64 << 20)],
)
def test_parse_size_accepts_suffixes(text: str, expected: int) -> None:
    assert parse_size(text, option="--heap", bounds=HEAP_RANGE) == expected


@pytest.mark.parametrize("text", ["", "1T", "-1G", "1.5G", "G"])
def test_parse_size_rejects_malformed(text: str) -> None:
    with pytest.raises(UsageError, match="--heap"):
        parse_size(text, option="--heap", bounds=HEAP_RANGE)


def test_parse_size_rejects_out_of_range() -> None:
    with pytest.raises(UsageError, match="out of range: expected 8M to 60G"):
        parse_size("4M", option="--heap", bounds=HEAP_RANGE)


def test_check_options_normalizes_and_collapses(tmp_path: Path) -> None:
    checked = check_options(
        options(tmp_path, protected=("/app/", "/app/lib", "//srv//data", "/app"))
    )
    assert checked.protected == ("/app", "/srv/data")


@pytest.mark.parametrize(
    ("protected", "plain", "message"),
    [
        (("app",), (), "is not absolute"),
        (("/",), (), "whole image"),
        (("/opt",), (), "overlaps /opt/enclavify"),
        (("/.enclavify/pack",), (), "overlaps /.enclavify"),
        (("/proc/self",), (), "kernel file system"),
        (("/app",), ("/app/static",), "overlaps --plain"),
        (("/app/lib",), ("/app",), "overlaps --plain"),
        ((), (), "no --dir given"),
    ],
)
def test_check_options_rejects_bad_regions(
    tmp_path: Path, protected: tuple[str, ...], plain: tuple[str, ...], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        check_options(options(tmp_path, protected=protected, plain=plain))


def test_check_options_rejects_relative_binary(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--binary 'python3' is not absolute"):
        check_options(options(tmp_path, binary="python3"))


@pytest.mark.parametrize("config_id", ["flask", "ns//service", "ns/sess ion/service"])
def test_check_options_rejects_bad_config_id(tmp_path: Path, config_id: str) -> None:
    with pytest.raises(UsageError, match="--config-id"):
        check_options(options(tmp_path, config_id=config_id))


def test_check_options_rejects_result_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        check_options(options(tmp_path, result_path=tmp_path / "missing" / "r.json"))


def test_check_options_rejects_result_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a directory"):
        check_options(options(tmp_path, result_path=tmp_path))


def test_check_options_fingerprints_cas_certificate(tmp_path: Path) -> None:
    pem = self_signed_pem()
    checked = check_options(options(tmp_path, cas_certificate=pem, cas_address="localhost:8081"))
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    assert checked.cas_fingerprint == hashlib.sha256(der).hexdigest()


def test_check_options_rejects_two_certificates(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="exactly one PEM block"):
        check_options(options(tmp_path, cas_certificate=self_signed_pem() + self_signed_pem()))


def test_check_options_rejects_garbage_certificate(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--cas-cert is not a PEM X\.509 certificate"):
        check_options(options(tmp_path, cas_certificate=b"not a certificate"))


@pytest.mark.parametrize(
    ("destination", "requested", "expected"),
    [
        ("docker://registry.example:5000/team/app:v1", None, "gzip"),
        ("oci:/tmp/out:1", None, "none"),
        ("oci-archive:/tmp/out.tar:1", None, "none"),
        ("docker-archive:/tmp/out.tar:app:1", None, "none"),
        ("native_flask_restapi_image", None, "none"),
        ("oci:/tmp/out:1", "gzip", "gzip"),
        ("docker://registry.example:5000/team/app:v1", "none", "none"),
    ],
)
def test_layer_compression_by_destination(
    tmp_path: Path, destination: str, requested: str | None, expected: str
) -> None:
    checked = check_options(options(tmp_path, destination=destination, compression=requested))
    assert checked.compression == expected


def test_check_options_rejects_compression(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--compression 'zip' is invalid: expected gzip or none"):
        check_options(options(tmp_path, compression="zip"))


def test_default_result_path_is_safe_for_any_reference(tmp_path: Path) -> None:
    name = safe_file_name("registry.example:5000/team/app:v1")
    assert name == "registry.example_5000_team_app_v1"
    assert safe_file_name("oci:/tmp/out:1") == "oci_tmp_out_1"
    path = default_result_path("docker://127.0.0.1:5055/a/b:c", tmp_path)
    assert path == tmp_path / "docker_127.0.0.1_5055_a_b_c.enclavify.json"


def native_config() -> ImageConfig:
    return ImageConfig(
        {
            "architecture": "amd64",
            "os": "linux",
            "author": "someone",
            "config": {
                "Env": ["PATH=/usr/bin:/bin", "API_TOKEN=s3cr3t-value", "LANG=C.UTF-8"],
                "Entrypoint": ["python3"],
                "Cmd": ["/app/main.py", "--serve"],
                "WorkingDir": "/app",
                "User": "app",
                "ExposedPorts": {"4996/tcp": {}},
                "Labels": {"team": "records", "org.enclavify.measurement": "forged"},
                "Healthcheck": {"Test": ["CMD", "curl", "-u", "admin:pw", "http://x"]},
            },
            "rootfs": {"type": "layers", "diff_ids": []},
        }
    )


def test_confidential_config_keeps_nothing_secret() -> None:
    config = imageconfig.confidential_config(
        native_config(),
        entrypoint=["/opt/enclavify/bin/launch"],
        runtime_version="0.1.0",
        measurement="ab" * 32,
        regions=["/app"],
        plain=["/srv/static"],
    )
    text = json.dumps(config.raw)
    assert "s3cr3t-value" not in text
    assert "admin:pw" not in text
    assert "/app/main.py" not in text
    assert "someone" not in text
    assert config.env == ["PATH=/usr/bin:/bin"]
    assert config.entrypoint == ["/opt/enclavify/bin/launch"]
    assert config.cmd is None
    assert config.user == "0:0"
    assert config.working_dir == "/"
    assert config.exposed_ports == ["4996/tcp"]
    assert config.labels["team"] == "records"
    assert config.labels["org.enclavify.measurement"] == "ab" * 32
    assert json.loads(config.labels["org.enclavify.protected"]) == ["/app"]
    assert json.loads(config.labels["org.enclavify.plain"]) == ["/srv/static"]


def test_original_command_and_environment() -> None:
    config = native_config()
    assert imageconfig.original_command(config) == ["python3", "/app/main.py", "--serve"]
    assert imageconfig.original_environment(config) == {
        "PATH": "/usr/bin:/bin",
        "API_TOKEN": "s3cr3t-value",
        "LANG": "C.UTF-8",
    }


def test_neutral_history_drops_native_commands() -> None:
    history: list[dict[str, Any]] = [
        {"created": "2024-01-01T00:00:00Z", "created_by": "ADD rootfs.tar /"},
        {
            "created": "2024-01-02T00:00:00Z",
            "created_by": "ENV API_TOKEN=s3cr3t",
            "empty_layer": True,
        },
        {"created": "2024-01-03T00:00:00Z", "created_by": "RUN echo s3cr3t > /app/key"},
    ]
    neutral = imageconfig.neutral_history(history, 2)
    assert "s3cr3t" not in json.dumps(neutral)
    times = [entry["created"] for entry in neutral]
    assert times == ["2024-01-01T00:00:00Z", "2024-01-03T00:00:00Z"]


def test_pending_result_is_private_until_published(tmp_path: Path) -> None:
    destination = tmp_path / "result.json"
    old_umask = os.umask(0)
    try:
        pending = PendingResult(destination, {"fspf_key": "00" * 32})
    finally:
        os.umask(old_umask)
    assert not destination.exists()
    assert stat.S_IMODE(pending.temporary.stat().st_mode) == 0o600
    pending.publish()
    assert stat.S_IMODE(destination.stat().st_mode) == 0o600
    assert json.loads(destination.read_text()) == {"fspf_key": "00" * 32}
    assert list(tmp_path.iterdir()) == [destination]


def test_pending_result_discard_leaves_nothing(tmp_path: Path) -> None:
    pending = PendingResult(tmp_path / "result.json", {"a": 1})
    pending.discard()
    pending.discard()
    assert list(tmp_path.iterdir()) == []


def test_line_progress_prints_steps_and_tasks() -> None:
    stream = io.StringIO()
    sink = progress.LineProgress(stream)
    sink.step("Opening image")
    with sink.task("Encrypting", total=2048) as task:
        task.advance(1024)
        task.advance(1024)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Opening image"
    assert lines[1] == "Encrypting (2.0 KiB)"
    assert lines[2].startswith("Encrypting: 2.0 KiB in ")


def test_quiet_progress_prints_nothing() -> None:
    stream = io.StringIO()
    sink = progress.for_stream(stream, quiet=True)
    sink.step("Opening image")
    with sink.task("Encrypting", total=10) as task:
        task.advance(10)
    assert stream.getvalue() == ""


def test_bars_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert type(progress.for_stream(io.StringIO())) is progress.LineProgress
    assert type(progress.for_stream(Terminal())) is progress.BarProgress
    assert type(progress.for_stream(Terminal(), bars=False)) is progress.LineProgress
    terminal = Terminal()
    sink = progress.for_stream(terminal)
    assert isinstance(sink, progress.BarProgress)
    sink.INTERVAL = 0.0
    with sink.task("Encrypting", total=100) as task:
        task.advance(50)
    assert "[##############--------------]" in terminal.getvalue()
    assert terminal.getvalue().rstrip().endswith("in 0.0 s")


def test_reporter_turns_callbacks_into_tasks() -> None:
    stream = io.StringIO()
    reporter = progress.LineProgress(stream).reporter()
    reporter(10, 20, "unpacking layers")
    reporter(20, 20, "unpacking layers")
    reporter(5, 0, "writing blobs")
    reporter.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "unpacking layers (20 B)"
    assert lines[1].startswith("unpacking layers: 20 B in")
    assert lines[2] == "writing blobs"
    assert lines[3].startswith("writing blobs: 5 B in")
