"""Crafted layers that try to escape the root or abuse links are rejected or neutralised.

Every test checks that nothing appeared outside the work directory and that the message
names the layer (its digest) and the entry.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import pytest

from enclavify.errors import HostileEntryError, ImageError
from enclavify.image import ImageBuilder, open_image

from .helpers import (
    compress,
    device,
    digest,
    directory,
    fifo,
    file,
    hardlink,
    symlink,
    tar_bytes,
    tree,
    write_layout,
)


def _open_expecting(
    tmp_path: Path, workdir: Path, layer: bytes, error: type[Exception], *names: str
) -> None:
    write_layout(tmp_path / "layout", [layer])
    before = tree(tmp_path) - tree(workdir)
    with pytest.raises(error) as raised:
        open_image(f"oci:{tmp_path / 'layout'}", workdir=workdir)
    message = str(raised.value)
    assert digest(compress(layer, "gzip")) in message
    for name in names:
        assert repr(name) in message
    assert tree(tmp_path) == before | {"work"}  # nothing new, and the work dir is empty again
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("name", ["../escape", "app/../../escape", "./../../tmp/escape"])
def test_dotdot_entry_is_rejected(tmp_path: Path, workdir: Path, name: str) -> None:
    layer = tar_bytes([file("ok", b"ok"), file(name, b"payload")])
    _open_expecting(tmp_path, workdir, layer, HostileEntryError, name)
    assert not (tmp_path.parent / "escape").exists()


def test_hardlink_escaping_root_is_rejected(tmp_path: Path, workdir: Path) -> None:
    layer = tar_bytes([hardlink("passwd", "../../../../etc/passwd")])
    _open_expecting(tmp_path, workdir, layer, HostileEntryError, "../../../../etc/passwd")


def test_hardlink_to_missing_target_is_rejected(tmp_path: Path, workdir: Path) -> None:
    layer = tar_bytes([hardlink("app/key", "etc/ssh/ssh_host_key")])
    _open_expecting(tmp_path, workdir, layer, HostileEntryError, "app/key", "etc/ssh/ssh_host_key")


def test_hardlink_to_absolute_host_path_is_rejected(tmp_path: Path, workdir: Path) -> None:
    # "/etc/passwd" means the image's /etc/passwd, which this layer does not contain.
    layer = tar_bytes([hardlink("copy", "/etc/passwd")])
    _open_expecting(tmp_path, workdir, layer, HostileEntryError, "copy", "/etc/passwd")


def test_hardlink_to_directory_is_rejected(tmp_path: Path, workdir: Path) -> None:
    layer = tar_bytes([directory("d"), hardlink("d2", "d")])
    _open_expecting(tmp_path, workdir, layer, HostileEntryError, "d2")


def test_entry_through_same_layer_symlink_is_rejected(tmp_path: Path, workdir: Path) -> None:
    layer = tar_bytes([symlink("out", "/tmp"), file("out/planted", b"x")])
    _open_expecting(tmp_path, workdir, layer, HostileEntryError, "out/planted", "out")


def test_invalid_whiteout_is_rejected(tmp_path: Path, workdir: Path) -> None:
    layer = tar_bytes([file("app/.wh..", b"")])
    _open_expecting(tmp_path, workdir, layer, HostileEntryError, "app/.wh..")


def test_sparse_file_is_unsupported(tmp_path: Path, workdir: Path) -> None:
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    layer = tar_bytes([(info, None)])
    _open_expecting(tmp_path, workdir, layer, ImageError, "sparse")


def test_symlink_outside_root_is_resolved_inside(tmp_path: Path, workdir: Path) -> None:
    layer = tar_bytes(
        [
            directory("app"),
            symlink("app/hostname", "/etc/hostname"),
            symlink("app/up", "../../../../../../etc/hostname"),
        ]
    )
    write_layout(tmp_path / "layout", [layer])
    with open_image(f"oci:{tmp_path / 'layout'}", workdir=workdir) as image:
        files = image.filesystem()
        assert files.entry("/app/hostname").type == "symlink"  # type: ignore[union-attr]
        assert files.resolve("/app/hostname") is None  # the image has no /etc/hostname
        assert files.resolve("/app/up") is None
        with pytest.raises(ImageError, match="does not exist in the image"):
            files.open("/app/up")


def test_absolute_names_are_taken_relative(
    tmp_path: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "absolute-target"
    layer = tar_bytes([file(str(marker), b"inside the image")])
    write_layout(tmp_path / "layout", [layer])
    with (
        caplog.at_level(logging.WARNING),
        open_image(f"oci:{tmp_path / 'layout'}", workdir=workdir) as image,
    ):
        assert image.filesystem().read_bytes(str(marker)) == b"inside the image"
    assert not marker.exists()
    assert f"entry {str(marker)!r} has an absolute name" in caplog.text


def test_devices_and_fifos_are_left_out(
    tmp_path: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layer = tar_bytes(
        [
            directory("dev"),
            device("dev/null", 1, 3),
            device("mem", 1, 1),
            fifo("app-fifo"),
            directory("app"),
            file("app/x", b"x"),
        ]
    )
    write_layout(tmp_path / "layout", [layer])
    with (
        caplog.at_level(logging.WARNING),
        open_image(f"oci:{tmp_path / 'layout'}", workdir=workdir) as image,
    ):
        files = image.filesystem()
        assert files.entry("/dev/null") is None
        assert files.entry("/mem") is None
        assert files.entry("/app-fifo") is None
        assert files.listdir("/dev") == []
        builder = ImageBuilder(image)
        assert builder.copy_layer_without(image.layers[0], ["/app"]) is True
        built = builder.build()
        with (
            built.layers[0].open_uncompressed() as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            names = [member.name for member in tar]
        assert names == ["dev", "app"]
    assert "device node 'mem'" in caplog.text
    assert "FIFO 'app-fifo'" in caplog.text
    assert "dev/null" not in caplog.text  # standard /dev nodes are logged at DEBUG only
    assert digest(compress(layer, "gzip")) in caplog.text


def test_layer_with_devices_and_nothing_excluded_is_copied_verbatim(
    tmp_path: Path, workdir: Path
) -> None:
    layer = tar_bytes(
        [directory("dev"), device("dev/null", 1, 3), fifo("run-fifo"), file("etc-x", b"x")]
    )
    write_layout(tmp_path / "layout", [layer])
    with open_image(f"oci:{tmp_path / 'layout'}", workdir=workdir) as image:
        builder = ImageBuilder(image)
        assert builder.copy_layer_without(image.layers[0], ["/app"]) is False
        copied = builder.build().layers[0]
        assert (copied.digest, copied.size) == (image.layers[0].digest, image.layers[0].size)


def test_duplicate_entry_later_wins(
    tmp_path: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layer = tar_bytes(
        [file("conf", b"first"), file("conf", b"second"), directory("d"), directory("d")]
    )
    write_layout(tmp_path / "layout", [layer])
    with (
        caplog.at_level(logging.WARNING),
        open_image(f"oci:{tmp_path / 'layout'}", workdir=workdir) as image,
    ):
        assert image.filesystem().read_bytes("/conf") == b"second"
    assert "entry 'conf' occurs more than once" in caplog.text
    assert "'d' occurs" not in caplog.text


def test_malformed_tar_is_image_error(tmp_path: Path, workdir: Path) -> None:
    layer = tar_bytes([file("a", b"a" * 2000)])[:1024] + b"garbage" * 100
    write_layout(tmp_path / "layout", [layer])
    with pytest.raises(ImageError, match=r"malformed tar|failed verification"):
        open_image(f"oci:{tmp_path / 'layout'}", workdir=workdir)
    assert list(workdir.iterdir()) == []


def test_archive_manifest_cannot_name_host_files(tmp_path: Path, workdir: Path) -> None:
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (
            ("config.json", config),
            ("manifest.json", b'[{"Config":"config.json","Layers":["../../../../etc/passwd"]}]'),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageError, match=r"layer '\.\./\.\./\.\./\.\./etc/passwd' is missing"):
        open_image(f"docker-archive:{archive}", workdir=workdir)


def test_layout_index_cannot_name_paths_as_digests(tmp_path: Path, workdir: Path) -> None:
    write_layout(tmp_path / "layout", [tar_bytes([file("a")])])
    index = tmp_path / "layout" / "index.json"
    index.write_text(
        '{"schemaVersion":2,"manifests":[{"mediaType":'
        '"application/vnd.oci.image.manifest.v1+json","digest":"sha256:../../../etc/passwd",'
        '"size":10}]}'
    )
    with pytest.raises(ImageError, match="invalid or unsupported digest"):
        open_image(f"oci:{tmp_path / 'layout'}", workdir=workdir)
