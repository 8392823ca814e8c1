"""Fixtures for the image tests: a work directory and a way to open hand-made images."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from enclavify.image import SourceImage, open_image

from .helpers import write_layout

OpenLayers = Callable[..., SourceImage]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def open_layers(tmp_path: Path, workdir: Path) -> Iterator[OpenLayers]:
    """Write the given layer tars as an OCI layout and open it; closed after the test."""
    opened: list[SourceImage] = []

    def opener(layers: Sequence[bytes], **options: Any) -> SourceImage:
        layout = tmp_path / f"layout-{len(opened)}"
        write_layout(layout, layers, **options)
        image = open_image(f"oci:{layout}", workdir=workdir)
        opened.append(image)
        return image

    yield opener
    for image in opened:
        image.close()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture
def engine_name(podman: str) -> Iterator[str]:
    """A unique podman image name; every image whose name starts with it is removed after."""
    name = f"localhost/enclavify-test-{uuid.uuid4().hex[:10]}"
    yield name
    listed = subprocess.run(
        [podman, "images", "--format", "{{.Repository}}:{{.Tag}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in listed.stdout.split():
        if line.startswith(name):
            subprocess.run([podman, "rmi", "-f", line], capture_output=True, check=False)
