"""Independent tools read what enclavify writes, and enclavify reads what they write."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from enclavify.image import ImageBuilder, LayerWriter, SourceImage, open_image

from .conftest import OpenLayers, require_tool
from .helpers import directory, file, symlink, tar_bytes, whiteout, write_layout

BASE = tar_bytes(
    [
        directory("app"),
        file("app/main.py", b"print('native')\n"),
        directory("etc"),
        file("etc/hostname", b"image\n"),
        symlink("etc/alias", "hostname"),
    ]
)
UPPER = tar_bytes([whiteout("etc", "hostname"), file("app/extra.py", b"extra\n")])


def _run(*argv: str) -> str:
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, f"{' '.join(argv)} failed:\n{completed.stderr}"
    return completed.stdout


def _snapshot(image: SourceImage) -> dict[str, tuple[str, bytes | str]]:
    files = image.filesystem()
    result: dict[str, tuple[str, bytes | str]] = {}
    for entry in files.walk("/"):
        if entry.type in ("file", "hardlink"):
            result[entry.path] = ("file", files.read_bytes(entry.path))
        else:
            result[entry.path] = (entry.type, entry.linkname)
    return result


def _add_fill(writer: LayerWriter) -> None:
    writer.add_directory("/opt", mode=0o755)
    writer.add_bytes("/opt/added", b"added\n", mode=0o600)


@pytest.fixture
def built(open_layers: OpenLayers) -> ImageBuilder:
    source = open_layers([BASE, UPPER])
    builder = ImageBuilder(source)
    for layer in source.layers:
        builder.copy_layer_without(layer, ["/app"])
    builder.add_layer(_add_fill, created_by="test: add /opt")
    builder.config = source.config.replace(cmd=["/opt/added"], labels={"test": "interop"})
    return builder


def test_skopeo_reads_every_output(built: ImageBuilder, tmp_path: Path) -> None:
    skopeo = require_tool("skopeo")
    outputs = {
        "oci": f"oci:{tmp_path / 'layout'}:v1",
        "oci-archive": f"oci-archive:{tmp_path / 'image.tar'}:v1",
        "docker-archive": f"docker-archive:{tmp_path / 'docker.tar'}:team/app:v1",
    }
    for name, reference in outputs.items():
        built.commit(reference)
        inspected = json.loads(_run(skopeo, "inspect", reference))
        assert inspected["Labels"] == {"test": "interop"}, name
        assert len(inspected["Layers"]) == 3, name
        config = json.loads(_run(skopeo, "inspect", "--config", reference))
        assert config["config"]["Cmd"] == ["/opt/added"], name
        # skopeo copy checks every blob's digest on the way
        target = tmp_path / f"copy-{name}"
        _run(skopeo, "copy", "--quiet", reference, f"oci:{target}:copied")
        assert (target / "index.json").is_file()


def test_reads_what_skopeo_writes(tmp_path: Path, workdir: Path) -> None:
    skopeo = require_tool("skopeo")
    write_layout(tmp_path / "src", [BASE, UPPER], tag="v1")
    with open_image(f"oci:{tmp_path / 'src'}:v1", workdir=workdir) as original:
        expected = _snapshot(original)
    copies = {
        "zstd": (
            ["--dest-compress-format", "zstd"],
            f"oci:{tmp_path / 'zstd'}:v1",
        ),
        "oci-archive": ([], f"oci-archive:{tmp_path / 'a.tar'}:v1"),
        "docker-archive": ([], f"docker-archive:{tmp_path / 'd.tar'}:team/app:v1"),
    }
    for name, (options, reference) in copies.items():
        _run(skopeo, "copy", "--quiet", *options, f"oci:{tmp_path / 'src'}:v1", reference)
        with open_image(reference, workdir=workdir) as image:
            assert _snapshot(image) == expected, name
            if name == "zstd":
                assert {layer.compression for layer in image.layers} == {"zstd"}
    assert expected["/etc/alias"] == ("symlink", "hostname")
    assert "/etc/hostname" not in expected


def test_reads_umoci_layout_with_whiteouts(tmp_path: Path, workdir: Path) -> None:
    umoci = require_tool("umoci")
    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    _run(umoci, "init", "--layout", str(layout))
    _run(umoci, "new", "--image", f"{layout}:t")
    _run(umoci, "unpack", "--rootless", "--image", f"{layout}:t", str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "srv").mkdir()
    (rootfs / "srv" / "keep").write_text("keep")
    (rootfs / "srv" / "gone").write_text("gone")
    (rootfs / "srv" / "sub").mkdir()
    (rootfs / "srv" / "sub" / "deep").write_text("deep")
    _run(umoci, "repack", "--refresh-bundle", "--image", f"{layout}:t", str(bundle))
    (rootfs / "srv" / "gone").unlink()
    (rootfs / "srv" / "sub" / "deep").unlink()
    (rootfs / "srv" / "sub").rmdir()
    (rootfs / "srv" / "new").write_text("new")
    _run(umoci, "repack", "--image", f"{layout}:t", str(bundle))
    _run(umoci, "config", "--image", f"{layout}:t", "--config.cmd", "/srv/new")
    with open_image(f"oci:{layout}:t", workdir=workdir) as image:
        files = image.filesystem()
        assert files.listdir("/srv") == ["keep", "new"]
        assert files.read_bytes("/srv/new") == b"new"
        assert image.config.cmd == ["/srv/new"]
        assert len(image.layers) == 2
        whiteouts = [
            e.path for layer in image.layers for e in layer.entries if e.kind == "whiteout"
        ]
        assert sorted(whiteouts) == ["/srv/gone", "/srv/sub"]


def test_umoci_reads_enclavify_layout(built: ImageBuilder, tmp_path: Path) -> None:
    umoci = require_tool("umoci")
    layout = tmp_path / "layout"
    built.commit(f"oci:{layout}:v1")
    _run(umoci, "unpack", "--rootless", "--image", f"{layout}:v1", str(tmp_path / "bundle"))
    rootfs = tmp_path / "bundle" / "rootfs"
    assert (rootfs / "opt" / "added").read_bytes() == b"added\n"
    assert list((rootfs / "app").iterdir()) == []
    assert not (rootfs / "etc" / "hostname").exists()


@pytest.mark.podman
def test_podman_loads_docker_archive(
    built: ImageBuilder, tmp_path: Path, podman: str, engine_name: str
) -> None:
    archive = tmp_path / "docker.tar"
    built.commit(f"docker-archive:{archive}:{engine_name.removeprefix('localhost/')}:v1")
    _run(podman, "load", "-q", "-i", str(archive))
    image_id = built.config_digest
    assert image_id is not None
    inspected = json.loads(_run(podman, "image", "inspect", image_id.split(":")[1]))[0]
    assert inspected["Config"]["Cmd"] == ["/opt/added"]
    assert inspected["Id"] == image_id.split(":")[1]
    # Tag with the unique name so the fixture removes the loaded image afterwards.
    _run(podman, "tag", image_id.split(":")[1], f"{engine_name}:loaded")
