"""Reading images: compression, manifests, indexes, configs and digest verification."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from enclavify.errors import ImageError
from enclavify.image import ImageBuilder, Platform, blobs, open_image

from .helpers import (
    LayoutWriter,
    compress,
    digest,
    file,
    tar_bytes,
    write_docker_archive,
    write_layout,
    write_multiplatform_layout,
)

LAYER = tar_bytes([file("app/main.py", b"print('hi')\n")])


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_layer_compressions_are_read(tmp_path: Path, workdir: Path, compression: str) -> None:
    write_layout(tmp_path / "l", [LAYER], compression=compression)
    with open_image(f"oci:{tmp_path / 'l'}", workdir=workdir) as image:
        layer = image.layers[0]
        assert layer.compression == compression
        assert layer.diff_id == digest(LAYER)
        assert layer.digest == digest(compress(LAYER, compression))
        assert image.filesystem().read_bytes("/app/main.py") == b"print('hi')\n"


def test_docker_media_types_are_read(tmp_path: Path, workdir: Path) -> None:
    write_layout(tmp_path / "l", [LAYER], docker_types=True)
    with open_image(f"oci:{tmp_path / 'l'}:latest", workdir=workdir) as image:
        assert image.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
        assert image.filesystem().entry("/app/main.py") is not None


def test_config_fields_and_history(tmp_path: Path, workdir: Path) -> None:
    config = {
        "Env": ["A=1", "PATH=/bin"],
        "Cmd": ["python3", "app.py"],
        "Entrypoint": ["/init"],
        "WorkingDir": "/app",
        "User": "1000:1000",
        "ExposedPorts": {"5000/tcp": {}, "443/tcp": {}},
        "Labels": {"team": "x"},
    }
    history = [{"created_by": "ADD rootfs"}, {"created_by": "ENV A=1", "empty_layer": True}]
    write_layout(tmp_path / "l", [LAYER], config=config, history=history)
    with open_image(f"oci:{tmp_path / 'l'}", workdir=workdir) as image:
        c = image.config
        assert c.env == ["A=1", "PATH=/bin"]
        assert c.cmd == ["python3", "app.py"]
        assert c.entrypoint == ["/init"]
        assert c.working_dir == "/app"
        assert c.user == "1000:1000"
        assert c.exposed_ports == ["443/tcp", "5000/tcp"]
        assert c.labels == {"team": "x"}
        assert image.history == history
        assert image.platform == Platform("linux", "amd64")
        changed = c.replace(cmd=None, env=["B=2"], labels={"k": "v"}, exposed_ports=["80/tcp"])
        assert changed.cmd is None
        assert changed.env == ["B=2"]
        assert changed.raw["config"]["ExposedPorts"] == {"80/tcp": {}}
        assert c.env == ["A=1", "PATH=/bin"]  # the original is unchanged


def test_corrupted_layer_blob_names_the_blob(tmp_path: Path, workdir: Path) -> None:
    descriptor = write_layout(tmp_path / "l", [LAYER])
    manifest = json.loads((tmp_path / "l/blobs/sha256" / descriptor["digest"][7:]).read_bytes())
    layer_digest = manifest["layers"][0]["digest"]
    blob = tmp_path / "l/blobs/sha256" / layer_digest[7:]
    data = bytearray(blob.read_bytes())
    data[-12] ^= 0xFF  # inside the gzip trailer's CRC region or payload
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=layer_digest):
        open_image(f"oci:{tmp_path / 'l'}", workdir=workdir)
    assert list(workdir.iterdir()) == []


def test_plain_layers_are_read_where_they_lie(tmp_path: Path, workdir: Path) -> None:
    second = tar_bytes([file("second", b"2" * 3000)])
    archive = tmp_path / "d.tar"
    write_docker_archive(archive, [LAYER, second])
    write_layout(tmp_path / "l", [LAYER, second], compression="none")
    blob_dir = tmp_path / "l/blobs/sha256"
    for reference, holders in (
        (f"docker-archive:{archive}", [archive, archive]),
        (f"oci:{tmp_path / 'l'}", [blob_dir / digest(LAYER)[7:], blob_dir / digest(second)[7:]]),
    ):
        with open_image(reference, workdir=workdir) as image:
            assert [layer.tar_path for layer in image.layers] == holders
            # Nothing was copied to the work directory.
            assert not any((image.work / "layers").iterdir())
            for layer, raw in zip(image.layers, (LAYER, second), strict=True):
                assert layer.diff_id == digest(raw)
                with layer.open_tar() as stream:
                    assert stream.read() == raw
            assert image.filesystem().read_bytes("/app/main.py") == b"print('hi')\n"
            assert image.filesystem().read_bytes("/second") == b"2" * 3000
    # In an archive the layers start after other members, and the index contains positions in it.
    with open_image(f"docker-archive:{archive}", workdir=workdir) as image:
        assert image.layers[1].tar_offset > image.layers[0].tar_offset > 0
        entry = image.layers[1].entries[0]
        with open(archive, "rb") as stream:
            stream.seek(entry.data_offset)
            assert stream.read(entry.size) == b"2" * 3000


def test_plain_blob_in_a_layout_is_verified(tmp_path: Path, workdir: Path) -> None:
    descriptor = write_layout(tmp_path / "l", [LAYER], compression="none")
    manifest = json.loads((tmp_path / "l/blobs/sha256" / descriptor["digest"][7:]).read_bytes())
    layer_digest = manifest["layers"][0]["digest"]
    blob = tmp_path / "l/blobs/sha256" / layer_digest[7:]
    blob.write_bytes(blob.read_bytes().replace(b"print('hi')", b"print('XX')"))
    with pytest.raises(ImageError, match=f"{layer_digest} failed verification: its content"):
        open_image(f"oci:{tmp_path / 'l'}", workdir=workdir)
    blob.write_bytes(LAYER + b"\0" * 512)
    with pytest.raises(ImageError, match="failed verification: its content has digest"):
        open_image(f"oci:{tmp_path / 'l'}", workdir=workdir)
    assert list(workdir.iterdir()) == []


def test_uncompressed_content_must_match_diff_id(tmp_path: Path, workdir: Path) -> None:
    writer = LayoutWriter(tmp_path / "l")
    other = tar_bytes([file("other", b"x")])
    descriptor, manifest_bytes = writer.image([LAYER])
    manifest = json.loads(manifest_bytes)
    config_path = tmp_path / "l/blobs/sha256" / manifest["config"]["digest"][7:]
    config = json.loads(config_path.read_bytes())
    config["rootfs"]["diff_ids"] = [digest(other)]
    config_bytes = json.dumps(config).encode()
    manifest["config"] = {
        **manifest["config"],
        "digest": writer.blob(config_bytes),
        "size": len(config_bytes),
    }
    data = json.dumps(manifest).encode()
    writer.index([{**descriptor, "digest": writer.blob(data), "size": len(data)}])
    with pytest.raises(ImageError, match="uncompressed content has digest"):
        open_image(f"oci:{tmp_path / 'l'}", workdir=workdir)


def test_tampered_config_is_rejected(tmp_path: Path, workdir: Path) -> None:
    descriptor = write_layout(tmp_path / "l", [LAYER])
    manifest = json.loads((tmp_path / "l/blobs/sha256" / descriptor["digest"][7:]).read_bytes())
    config_blob = tmp_path / "l/blobs/sha256" / manifest["config"]["digest"][7:]
    config_blob.write_bytes(config_blob.read_bytes().replace(b"/app/run", b"/bin/evil"))
    with pytest.raises(ImageError, match=r"config sha256:.* failed verification"):
        open_image(f"oci:{tmp_path / 'l'}", workdir=workdir)


def test_missing_tag_lists_available_tags(tmp_path: Path, workdir: Path) -> None:
    write_layout(tmp_path / "l", [LAYER], tag="v1")
    with pytest.raises(ImageError, match=r"no image tagged 'v2' \(tags: v1\)"):
        open_image(f"oci:{tmp_path / 'l'}:v2", workdir=workdir)


def test_index_selects_requested_platform(tmp_path: Path, workdir: Path) -> None:
    write_multiplatform_layout(
        tmp_path / "l",
        {
            "linux/amd64": [tar_bytes([file("arch", b"amd64")])],
            "linux/arm64/v8": [tar_bytes([file("arch", b"arm64")])],
            "linux/arm/v7": [tar_bytes([file("arch", b"armv7")])],
        },
    )
    for wanted, expected in (
        ("linux/arm64", b"arm64"),
        ("linux/arm/v7", b"armv7"),
        ("linux/amd64", b"amd64"),
    ):
        with open_image(f"oci:{tmp_path / 'l'}", platform=wanted, workdir=workdir) as image:
            assert image.filesystem().read_bytes("/arch") == expected
            assert str(image.platform).startswith(wanted)


def test_index_defaults_to_host_platform(tmp_path: Path, workdir: Path) -> None:
    host = Platform.host()
    write_multiplatform_layout(
        tmp_path / "l",
        {
            "linux/s390x": [tar_bytes([file("arch", b"s390x")])],
            f"linux/{host.architecture}": [tar_bytes([file("arch", b"host")])],
        },
    )
    with open_image(f"oci:{tmp_path / 'l'}", workdir=workdir) as image:
        assert image.filesystem().read_bytes("/arch") == b"host"


def test_absent_platform_lists_available(tmp_path: Path, workdir: Path) -> None:
    write_multiplatform_layout(tmp_path / "l", {"linux/amd64": [LAYER], "linux/arm64": [LAYER]})
    with pytest.raises(ImageError, match=r"available: linux/amd64, linux/arm64\)"):
        open_image(f"oci:{tmp_path / 'l'}", platform="linux/riscv64", workdir=workdir)


def test_single_platform_image_checks_requested_platform(tmp_path: Path, workdir: Path) -> None:
    write_layout(tmp_path / "l", [LAYER])
    with pytest.raises(ImageError, match="single-platform image for linux/amd64"):
        open_image(f"oci:{tmp_path / 'l'}", platform="linux/arm64", workdir=workdir)


def test_own_docker_archive_is_read(tmp_path: Path, workdir: Path) -> None:
    archive = tmp_path / "d.tar"
    write_docker_archive(
        archive, [LAYER, tar_bytes([file("second", b"2")])], repo_tags=["team/app:1"]
    )
    for reference in (f"docker-archive:{archive}", f"docker-archive:{archive}:team/app:1"):
        with open_image(reference, workdir=workdir) as image:
            assert len(image.layers) == 2
            assert image.layers[0].diff_id == digest(LAYER)
            assert image.filesystem().read_bytes("/second") == b"2"
    with pytest.raises(ImageError, match="no image named 'other:latest'"):
        open_image(f"docker-archive:{archive}:other", workdir=workdir)


def test_docker_archive_layer_is_verified_against_config(tmp_path: Path, workdir: Path) -> None:
    archive = tmp_path / "d.tar"
    write_docker_archive(archive, [LAYER])
    data = archive.read_bytes().replace(b"print('hi')", b"print('XX')")
    archive.write_bytes(data)
    with pytest.raises(ImageError, match="uncompressed content has digest"):
        open_image(f"docker-archive:{archive}", workdir=workdir)


def test_progress_and_cleanup(tmp_path: Path, workdir: Path) -> None:
    write_layout(tmp_path / "l", [LAYER, tar_bytes([file("b", b"b" * 5000)])])
    calls: list[tuple[int, int, str]] = []
    image = open_image(
        f"oci:{tmp_path / 'l'}",
        workdir=workdir,
        progress=lambda done, total, label: calls.append((done, total, label)),
    )
    assert calls
    assert calls[-1][0] == calls[-1][1]
    assert any(workdir.iterdir())
    image.close()
    assert list(workdir.iterdir()) == []


def test_missing_layout_is_clear(tmp_path: Path, workdir: Path) -> None:
    with pytest.raises(ImageError, match="not an OCI image layout"):
        open_image(f"oci:{tmp_path / 'nothing'}", workdir=workdir)
    with pytest.raises(ImageError, match="no such file"):
        open_image(f"oci-archive:{tmp_path / 'nothing.tar'}", workdir=workdir)


def test_hashing_reader_rejects_none_read() -> None:
    class NothingReady(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> None:  # type: ignore[override]
            return None  # what a non-blocking stream returns when no data is ready

    reader = blobs.HashingReader(NothingReady())  # type: ignore[arg-type]
    with pytest.raises(BlockingIOError, match="returned no data"):
        reader.readinto(bytearray(16))


def test_commit_checks_in_place_file_unchanged(tmp_path: Path, workdir: Path) -> None:
    archive = tmp_path / "d.tar"
    write_docker_archive(archive, [LAYER, tar_bytes([file("secret/key", b"k")])])
    with open_image(f"docker-archive:{archive}", workdir=workdir) as image:
        assert image.filesystem().sources_unchanged()
        builder = ImageBuilder(image)
        builder.copy_layer(image.layers[0])
        builder.copy_layer_without(image.layers[1], ["/secret"])
        before = sorted(p.name for p in tmp_path.iterdir())
        # Written again by another export: same bytes, a new modification time.
        info = archive.stat()
        os.utime(archive, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
        with pytest.raises(ImageError, match=r"d\.tar changed while the image was being"):
            builder.commit(f"oci:{tmp_path / 'out'}")
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert not image.filesystem().sources_unchanged()
        archive.unlink()
        with pytest.raises(ImageError, match=r"d\.tar can no longer be read"):
            builder.commit(f"oci:{tmp_path / 'out'}")
        builder.close()


def test_content_key_same_in_place_and_unpacked(tmp_path: Path, workdir: Path) -> None:
    archive = tmp_path / "d.tar"
    write_docker_archive(archive, [LAYER])
    write_layout(tmp_path / "l", [LAYER])
    keys = []
    for reference in (f"docker-archive:{archive}", f"oci:{tmp_path / 'l'}"):
        with open_image(reference, workdir=workdir) as image:
            keys.append(image.filesystem().content_key("/app/main.py"))
    assert keys[0] is not None
    assert keys[0] == keys[1]
