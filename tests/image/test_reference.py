from __future__ import annotations

from pathlib import Path

import pytest

from enclavify.errors import UsageError
from enclavify.image import parse_reference


@pytest.mark.parametrize(
    ("text", "transport", "fields"),
    [
        ("oci:/tmp/layout", "oci", {"path": Path("/tmp/layout"), "tag": None}),
        ("oci:/tmp/layout:v1", "oci", {"path": Path("/tmp/layout"), "tag": "v1"}),
        ("oci-archive:out.tar:latest", "oci-archive", {"path": Path("out.tar"), "tag": "latest"}),
        ("docker-archive:/a.tar", "docker-archive", {"path": Path("/a.tar"), "repository": None}),
        (
            "docker-archive:/a.tar:localhost:5000/team/app:2",
            "docker-archive",
            {"repository": "localhost:5000/team/app", "tag": "2"},
        ),
        (
            "docker://127.0.0.1:5055/team/app:1.0",
            "docker",
            {"host": "127.0.0.1:5055", "repository": "team/app", "tag": "1.0"},
        ),
        (
            "docker://registry.example/app@sha256:" + "a" * 64,
            "docker",
            {"host": "registry.example", "repository": "app", "digest": "sha256:" + "a" * 64},
        ),
        (
            "native_flask_restapi_image",
            "engine",
            {"repository": "native_flask_restapi_image", "tag": None, "engine": None},
        ),
        ("localhost/x:tag", "engine", {"repository": "localhost/x", "tag": "tag"}),
        (
            "registry.example:5000/team/app:3",
            "engine",
            {"repository": "registry.example:5000/team/app", "tag": "3"},
        ),
        (
            "containers-storage:localhost/x",
            "engine",
            {"repository": "localhost/x", "engine": "podman"},
        ),
        ("docker-daemon:app:1", "engine", {"repository": "app", "tag": "1", "engine": "docker"}),
    ],
)
def test_reference_forms(text: str, transport: str, fields: dict[str, object]) -> None:
    reference = parse_reference(text)
    assert reference.transport == transport
    for name, value in fields.items():
        assert getattr(reference, name) == value, name


def test_reference_round_trips_through_str() -> None:
    for text in (
        "oci:/tmp/l:v1",
        "oci-archive:/tmp/a.tar",
        "docker-archive:/tmp/a.tar:app:1",
        "docker://127.0.0.1:5055/team/app:1",
    ):
        assert str(parse_reference(text)) == text


def test_engine_name_defaults_to_latest() -> None:
    assert parse_reference("app").name == "app:latest"
    assert parse_reference("localhost:5000/app").name == "localhost:5000/app:latest"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1:5055", True),
        ("localhost", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("registry.example", False),
    ],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert parse_reference(f"docker://{host}/app").is_loopback is loopback


@pytest.mark.parametrize(
    "text",
    [
        "",
        " app",
        "oci:",
        "oci:/tmp/x:bad tag",
        "docker://app",
        "docker://host/",
        "docker://host/App",
        "app@sha256:123",
        "ftp://host/app",
        "team/App",
        "docker-archive::x",
        "docker-archive:/a.tar:app@sha256:" + "a" * 64,
    ],
)
def test_malformed_reference_is_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="invalid image reference"):
        parse_reference(text)
