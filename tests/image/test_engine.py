"""The local engine transport through podman: save, load, tag, names with '/' and ':'."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from enclavify.errors import ImageError
from enclavify.image import ImageBuilder, open_image
from enclavify.image.engine import find_engine

from .conftest import OpenLayers
from .helpers import directory, file, symlink, tar_bytes

pytestmark = pytest.mark.podman

LAYERS = [
    tar_bytes(
        [
            directory("app"),
            file("app/main.py", b"print('engine')\n"),
            symlink("app/current", "main.py"),
        ]
    ),
    tar_bytes([file("app/second.py", b"second\n")]),
]


def _podman_json(podman: str, *argv: str) -> object:
    completed = subprocess.run([podman, *argv], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_engine_round_trip_with_nested_name(
    open_layers: OpenLayers, podman: str, engine_name: str, workdir: Path
) -> None:
    source = open_layers(LAYERS)
    builder = ImageBuilder(source)
    builder.copy_layer(source.layers[0])
    builder.copy_layer_without(source.layers[1], ["/app"])
    builder.add_layer(lambda w: w.add_bytes("/opt/x", b"x"), created_by="test")
    builder.config = source.config.replace(cmd=["/opt/x"], working_dir="/app")
    for name in (f"{engine_name}:v1", f"{engine_name}/nested/part:2.0"):
        builder.commit(name)
        inspected = _podman_json(podman, "image", "inspect", name)
        assert isinstance(inspected, list)
        assert inspected[0]["Config"]["Cmd"] == ["/opt/x"]
        assert inspected[0]["Id"] == builder.config_digest.split(":")[1]  # type: ignore[union-attr]
        with open_image(name, workdir=workdir) as image:
            files = image.filesystem()
            assert files.read_bytes("/app/current") == b"print('engine')\n"
            assert files.entry("/app/second.py") is None
            assert files.read_bytes("/opt/x") == b"x"
            assert image.config.working_dir == "/app"
    # the archive used for loading is gone
    assert not list(workdir.rglob("load-*.tar"))


def test_bare_name_is_normalised_by_podman(
    open_layers: OpenLayers, podman: str, engine_name: str, workdir: Path
) -> None:
    source = open_layers(LAYERS[:1])
    builder = ImageBuilder(source)
    builder.copy_layer(source.layers[0])
    bare = engine_name.removeprefix("localhost/")
    builder.commit(bare)
    with open_image(bare, workdir=workdir) as image:
        assert image.filesystem().read_bytes("/app/main.py") == b"print('engine')\n"
    with open_image(f"containers-storage:{engine_name}:latest", workdir=workdir) as image:
        assert len(image.layers) == 1


def test_missing_engine_image_is_clear(podman: str, engine_name: str, workdir: Path) -> None:
    with pytest.raises(ImageError, match="podman save"):
        open_image(f"{engine_name}:absent", workdir=workdir)
    assert list(workdir.iterdir()) == []


def test_missing_engine_cli_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ImageError, match="no container engine found"):
        find_engine()


def test_reads_image_built_by_podman(
    podman: str, engine_name: str, tmp_path: Path, workdir: Path
) -> None:
    context = tmp_path / "context"
    (context / "app").mkdir(parents=True)
    (context / "app" / "main.py").write_text("print('built')\n")
    (context / "Containerfile").write_text(
        "FROM scratch\nCOPY app /app\nENV GREETING=hello\nWORKDIR /app\n"
        'COPY app/main.py /app/copy.py\nCMD ["python3", "main.py"]\n'
    )
    built = subprocess.run(
        [podman, "build", "-q", "-t", f"{engine_name}:built", str(context)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    with open_image(f"{engine_name}:built", workdir=workdir) as image:
        files = image.filesystem()
        assert files.read_bytes("/app/main.py") == b"print('built')\n"
        assert files.read_bytes("/app/copy.py") == b"print('built')\n"
        assert image.config.cmd == ["python3", "main.py"]
        assert "GREETING=hello" in image.config.env
        assert image.config.working_dir == "/app"
        layers_in_history = [e for e in image.history if not e.get("empty_layer")]
        assert len(layers_in_history) == len(image.layers)
        builder = ImageBuilder(image)
        for layer in image.layers:
            builder.copy_layer_without(layer, ["/app"])
        history = json.loads(builder.build().config)["history"]
        assert any("ENV GREETING=hello" in e.get("created_by", "") for e in history)
        assert not any("COPY" in e.get("created_by", "") for e in history)
