"""Building images: rewriting layers, adding layers, history, and atomic commits."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from pathlib import Path

import pytest

from enclavify.errors import ImageError
from enclavify.image import ImageBuilder, LayerWriter, SourceImage, open_image
from enclavify.image.builder import REWRITTEN_CREATED_BY, RewriteStopped

from .conftest import OpenLayers
from .helpers import (
    digest,
    directory,
    file,
    hardlink,
    opaque,
    symlink,
    tar_bytes,
    whiteout,
    write_layout,
)

SECRET = b"patient-records-secret-content"

BASE = tar_bytes(
    [
        directory("app"),
        file("app/rest_api.py", SECRET),
        directory("app/lib"),
        file("app/lib/util.py", SECRET + b"-util"),
        directory("etc"),
        file("etc/os-release", b"os"),
        file("usr-bin-python3", b"ELF"),
        hardlink("app/python-copy", "usr-bin-python3"),
        file("app/linked-secret", SECRET + b"-linked"),
        hardlink("etc/exposed", "app/linked-secret"),
    ]
)
UPPER = tar_bytes(
    [
        directory("app"),
        opaque("app/lib"),
        whiteout("app", "old.py"),
        whiteout("etc", "motd"),
        file("app/new.py", SECRET + b"-new"),
        symlink("app/current", "rest_api.py"),
    ]
)
HISTORY = [
    {"created_by": "ADD base", "created": "2024-01-01T00:00:00Z"},
    {"created_by": "ENV A=1", "empty_layer": True},
    {"created_by": "COPY app /app  # secret=hunter2", "created": "2024-01-02T00:00:00Z"},
    {"created_by": 'CMD ["python3"]', "empty_layer": True},
]


def _members(stream: io.BufferedIOBase | io.RawIOBase | object) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
        return {member.name: member for member in tar}


@pytest.fixture
def source(open_layers: OpenLayers) -> SourceImage:
    return open_layers([BASE, UPPER], history=HISTORY)


def _built_layer_bytes(builder: ImageBuilder, number: int) -> bytes:
    with builder.build().layers[number].open_uncompressed() as stream:
        return stream.read()


def test_rewrite_removes_content_from_blob(source: SourceImage) -> None:
    builder = ImageBuilder(source)
    assert builder.copy_layer_without(source.layers[0], ["/app"]) is True
    assert builder.copy_layer_without(source.layers[1], ["/app/"]) is True
    for number in (0, 1):
        raw = _built_layer_bytes(builder, number)
        assert SECRET + b"-util" not in raw
        assert b"rest_api.py" not in raw
        names = set(_members(io.BytesIO(raw)))
        assert "app" in names or "app/" in names  # the mount point stays
        assert not any(name.startswith("app/") for name in names), names
    # the blob itself, compressed, has changed digest, and the diff_id matches its content
    layer = builder.build().layers[0]
    assert layer.digest != source.layers[0].digest
    assert layer.diff_id == digest(_built_layer_bytes(builder, 0))


def test_rewrite_drops_whiteouts_into_excluded_but_keeps_others(source: SourceImage) -> None:
    builder = ImageBuilder(source)
    builder.copy_layer_without(source.layers[1], ["/app"])
    names = set(_members(io.BytesIO(_built_layer_bytes(builder, 0))))
    assert "etc/.wh.motd" in names
    assert "app/.wh.old.py" not in names
    assert "app/lib/.wh..wh..opq" not in names


def test_hardlink_to_removed_target_is_materialized(source: SourceImage) -> None:
    builder = ImageBuilder(source)
    builder.copy_layer_without(source.layers[0], ["/app"])
    raw = _built_layer_bytes(builder, 0)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        exposed = tar.getmember("etc/exposed")
        assert exposed.isreg()
        extracted = tar.extractfile(exposed)
        assert extracted is not None
        assert extracted.read() == SECRET + b"-linked"
        assert "app/python-copy" not in tar.getnames()
        assert tar.getmember("usr-bin-python3").isreg()


def test_stopped_rewrite_leaves_no_blob(source: SourceImage) -> None:
    builder = ImageBuilder(source)
    stop = threading.Event()
    stop.set()
    with pytest.raises(RewriteStopped, match="rewriting layer 0 was stopped"):
        builder.copy_layer_without(source.layers[0], ["/app"], stop=stop)
    assert builder.layers == []
    assert list(builder._work.iterdir()) == []


def test_made_layer_appended_in_order(source: SourceImage) -> None:
    builder = ImageBuilder(source)
    layer = builder.make_layer(
        lambda writer: writer.add_bytes("/made", b"x", mode=0o644, uid=0, gid=0, mtime=0.0),
        created_by="made first",
        compressed=False,
    )
    builder.copy_layer_without(source.layers[0], ["/app"])
    builder.append(layer)
    built = builder.build()
    assert [layer.history[-1]["created_by"] for layer in built.layers][-1] == "made first"
    # An uncompressed layer's blob is its content, so one digest serves both.
    assert built.layers[1].media_type == "application/vnd.oci.image.layer.v1.tar"
    assert built.layers[1].digest == built.layers[1].diff_id
    assert "made" in _members(io.BytesIO(_built_layer_bytes(builder, 1)))


def test_uncompressed_builder_writes_plain_tars(source: SourceImage) -> None:
    gzip_builder = ImageBuilder(source)
    gzip_builder.copy_layer_without(source.layers[0], ["/app"])
    builder = ImageBuilder(source, compression="none")
    builder.copy_layer_without(source.layers[0], ["/app"])
    builder.add_layer(
        lambda writer: writer.add_bytes("/made", b"x", mode=0o644, uid=0, gid=0, mtime=0.0),
        created_by="made",
    )
    rewritten, added = builder.build().layers
    for layer in (rewritten, added):
        assert layer.media_type == "application/vnd.oci.image.layer.v1.tar"
        assert layer.digest == layer.diff_id
        with layer.open_blob() as blob, layer.open_uncompressed() as content:
            assert blob.read() == content.read()
    # The content is the same either way; only the blob differs.
    assert rewritten.diff_id == gzip_builder.build().layers[0].diff_id
    assert gzip_builder.build().layers[0].media_type.endswith("+gzip")


def test_builder_rejects_unknown_compression(source: SourceImage) -> None:
    with pytest.raises(ValueError, match="invalid layer compression 'zstd'"):
        ImageBuilder(source, compression="zstd")


def test_layer_without_excluded_entries_is_copied_verbatim(source: SourceImage) -> None:
    builder = ImageBuilder(source)
    assert builder.copy_layer_without(source.layers[0], ["/srv"]) is False
    layer = builder.build().layers[0]
    assert (layer.digest, layer.size) == (source.layers[0].digest, source.layers[0].size)


def test_history_is_kept_or_neutralised(source: SourceImage) -> None:
    builder = ImageBuilder(source)
    builder.copy_layer_without(source.layers[0], ["/srv"])
    builder.copy_layer_without(source.layers[1], ["/app"])
    builder.add_layer(lambda w: w.add_bytes("/x", b"x"), created_by="enclavify: test layer")
    config = json.loads(builder.build().config)
    history = config["history"]
    assert [entry["created_by"] for entry in history] == [
        "ADD base",
        "ENV A=1",
        REWRITTEN_CREATED_BY,
        'CMD ["python3"]',
        "enclavify: test layer",
    ]
    assert "hunter2" not in json.dumps(config)
    assert history[2]["created"] == "2024-01-02T00:00:00Z"
    assert sum(not entry.get("empty_layer") for entry in history) == 3
    assert len(config["rootfs"]["diff_ids"]) == 3


def test_added_layer_round_trips_through_every_archive(
    source: SourceImage, tmp_path: Path, workdir: Path
) -> None:
    payload = bytes(range(256)) * 1000

    def fill(writer: LayerWriter) -> None:
        writer.add_directory("/.enclavify", mode=0o700)
        writer.add_file("/.enclavify/blob", _Trickle(payload), len(payload), mode=0o444, uid=7)
        writer.add_symlink("/.enclavify/link", "blob")
        writer.add_hardlink("/.enclavify/hard", "/.enclavify/blob")

    builder = ImageBuilder(source)
    for layer in source.layers:
        builder.copy_layer_without(layer, ["/app"])
    builder.add_layer(fill, created_by="added")
    builder.config = source.config.replace(cmd=["/bin/run"], env=["X=1"])
    targets = [
        f"oci:{tmp_path / 'out'}:v1",
        f"oci-archive:{tmp_path / 'out.tar'}:v1",
        f"docker-archive:{tmp_path / 'd.tar'}:team/app:v1",
    ]
    digests = {builder.commit(target) for target in targets}
    assert len(digests) == 1
    for target in targets:
        with open_image(target, workdir=workdir) as image:
            files = image.filesystem()
            assert files.read_bytes("/.enclavify/blob") == payload
            assert files.read_bytes("/.enclavify/hard") == payload
            assert files.resolve("/.enclavify/link") == "/.enclavify/blob"
            entry = files.entry("/.enclavify/blob")
            assert entry is not None
            assert (entry.mode, entry.uid) == (0o444, 7)
            assert [e.path for e in files.walk("/app")] == ["/app"]
            assert files.read_bytes("/etc/exposed") == SECRET + b"-linked"
            assert image.config.cmd == ["/bin/run"]
            assert image.config.env == ["X=1"]
            assert len(image.layers) == 3


class _Trickle(io.RawIOBase):
    """A stream that returns at most 1000 bytes per read, like a socket."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._data.read(min(len(buffer), 1000))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_layer_writer_rejects_bad_input(source: SourceImage) -> None:
    builder = ImageBuilder(source)

    def duplicate(writer: LayerWriter) -> None:
        writer.add_bytes("/a", b"1")
        writer.add_bytes("/a", b"2")

    def escaping(writer: LayerWriter) -> None:
        writer.add_bytes("/a/../../b", b"1")

    def short(writer: LayerWriter) -> None:
        writer.add_file("/a", io.BytesIO(b"abc"), 10)

    def dangling_hardlink(writer: LayerWriter) -> None:
        writer.add_hardlink("/a", "/missing")

    for fill, error in (
        (duplicate, ValueError),
        (escaping, ValueError),
        (short, ImageError),
        (dangling_hardlink, ValueError),
    ):
        with pytest.raises(error):
            builder.add_layer(fill, created_by="x")
    assert builder.layers == []
    assert not any(p.name.startswith("new-") for p in builder._work.iterdir())


def test_existing_layout_keeps_other_tags(
    source: SourceImage, tmp_path: Path, workdir: Path
) -> None:
    out = tmp_path / "out"
    builder = ImageBuilder(source)
    builder.copy_layer(source.layers[0])
    first = builder.commit(f"oci:{out}:one")
    builder.copy_layer(source.layers[1])
    second = builder.commit(f"oci:{out}:two")
    assert first != second
    index = json.loads((out / "index.json").read_text())
    tags = {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in index["manifests"]
    }
    assert tags == {"one": first, "two": second}
    with open_image(f"oci:{out}:one", workdir=workdir) as image:
        assert len(image.layers) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout-0", "out", "work"]


def test_failed_commit_leaves_nothing(source: SourceImage, tmp_path: Path) -> None:
    builder = ImageBuilder(source)
    for layer in source.layers:
        builder.copy_layer(layer)
    # Corrupt the source blob after opening: the copy must notice and roll back.
    blob = source.layers[1].open_blob()
    path = Path(blob.name)  # type: ignore[attr-defined]
    blob.close()
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF
    path.write_bytes(bytes(data))
    before = sorted(p.name for p in tmp_path.iterdir())
    for target in (f"oci:{tmp_path / 'out'}", f"oci-archive:{tmp_path / 'out.tar'}"):
        with pytest.raises(ImageError, match="failed verification"):
            builder.commit(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # A docker archive contains the uncompressed tars unpacked at open; they are checked too.
    unpacked = source.layers[0].tar_path
    unpacked.write_bytes(unpacked.read_bytes().replace(b"ELF", b"FLE"))
    with pytest.raises(ImageError, match="failed verification"):
        builder.commit(f"docker-archive:{tmp_path / 'd.tar'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("transport", ["docker-archive", "oci-archive"])
def test_archives_hold_plain_builder_layers(
    source: SourceImage, tmp_path: Path, workdir: Path, transport: str
) -> None:
    builder = ImageBuilder(source, compression="none")
    builder.copy_layer_without(source.layers[0], ["/app"])
    builder.copy_layer(source.layers[1])
    built = builder.build()
    archive = tmp_path / "out.tar"
    builder.commit(f"{transport}:{archive}")
    # Reading the archive back checks every digest against its content.
    with open_image(f"{transport}:{archive}", workdir=workdir) as image:
        assert [layer.diff_id for layer in image.layers] == [
            layer.diff_id for layer in built.layers
        ]


def test_archive_rejects_wrong_size_layer(
    source: SourceImage, tmp_path: Path
) -> None:
    builder = ImageBuilder(source, compression="none")
    builder.copy_layer_without(source.layers[0], ["/app"])
    own = builder.build().layers[0].path
    assert own is not None
    with open(own, "ab") as blob:
        blob.write(b"\0" * 512)
    before = sorted(p.name for p in tmp_path.iterdir())
    for target in (f"docker-archive:{tmp_path / 'd.tar'}", f"oci-archive:{tmp_path / 'o.tar'}"):
        with pytest.raises(ImageError, match=r"in the work directory is \d+ bytes, expected"):
            builder.commit(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_docker_archive_names_corrupt_layer(source: SourceImage, tmp_path: Path) -> None:
    builder = ImageBuilder(source)  # gzip layers, inflated into a docker archive
    builder.copy_layer_without(source.layers[0], ["/app"])
    own = builder.build().layers[0].path
    assert own is not None
    data = bytearray(own.read_bytes())
    for position in range(20, len(data) - 8, 7):  # the deflate stream, not the header
        data[position] ^= 0x5A
    own.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"layer 0 blob sha256:[0-9a-f]+ failed verification"):
        builder.commit(f"docker-archive:{tmp_path / 'd.tar'}")
    assert not (tmp_path / "d.tar").exists()


def test_commit_refuses_to_replace_foreign_directory(source: SourceImage, tmp_path: Path) -> None:
    target = tmp_path / "not-a-layout"
    target.mkdir()
    (target / "important.txt").write_text("keep")
    builder = ImageBuilder(source)
    builder.copy_layer(source.layers[0])
    with pytest.raises(ImageError, match="not an OCI layout"):
        builder.commit(f"oci:{target}")
    assert (target / "important.txt").read_text() == "keep"


def test_config_drops_build_container_state(tmp_path: Path, workdir: Path) -> None:
    write_layout(tmp_path / "l", [BASE])
    with open_image(f"oci:{tmp_path / 'l'}", workdir=workdir) as image:
        builder = ImageBuilder(image)
        builder.copy_layer(image.layers[0])
        builder.config = image.config.replace(
            raw_changes={"container_config": {"Cmd": ["/bin/sh", "-c", "echo secret"]}}
        )
        assert b"echo secret" not in builder.build().config


def test_layer_from_other_image_is_refused(source: SourceImage, open_layers: OpenLayers) -> None:
    other = open_layers([BASE])
    with pytest.raises(ValueError, match="does not belong"):
        ImageBuilder(source).copy_layer(other.layers[0])


def test_progress_reports_rewrite_and_commit(source: SourceImage, tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    builder = ImageBuilder(
        source, progress=lambda done, total, label: calls.append((done, total, label))
    )
    builder.copy_layer_without(source.layers[0], ["/app"])
    builder.commit(f"oci-archive:{tmp_path / 'out.tar'}")
    labels = {label for _, _, label in calls}
    assert labels == {"rewriting layer 0", "writing archive"}
    for label in labels:
        last = [call for call in calls if call[2] == label][-1]
        assert last[0] == last[1]


def test_rewrite_keeps_headers_byte_for_byte(open_layers: OpenLayers) -> None:
    long_name = "usr/" + "d" * 120 + "/tool"
    capable, data = file("usr/bin/ping", b"ELF")
    capable.pax_headers = {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info, content = file(long_name, b"long")
        tar.addfile(info, io.BytesIO(content or b""))
    pax_part = tar_bytes([(capable, data), file("app/secret", SECRET), file("ünïcode", b"u")])
    # Two tar streams joined: GNU long-name member first, then the PAX members.
    layer = gnu.getvalue().rstrip(b"\0") + b"\0" * (-len(gnu.getvalue().rstrip(b"\0")) % 512)
    layer += pax_part
    source = open_layers([layer])
    builder = ImageBuilder(source)
    assert builder.copy_layer_without(source.layers[0], ["/app"]) is True
    raw = _built_layer_bytes(builder, 0)
    assert SECRET not in raw
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = tar.getnames()
        ping = tar.getmember("usr/bin/ping")
    assert long_name in names
    assert "ünïcode" in names
    assert ping.pax_headers["SCHILY.xattr.security.capability"] == "\x01\x00\x00\x02"


def test_same_layer_rewritten_twice_keeps_both(source: SourceImage) -> None:
    builder = ImageBuilder(source)
    builder.copy_layer_without(source.layers[0], ["/app"])
    builder.copy_layer_without(source.layers[0], ["/etc"])
    first = _built_layer_bytes(builder, 0)
    second = _built_layer_bytes(builder, 1)
    assert b"os-release" in first
    assert b"os-release" not in second
    assert SECRET + b"-util" in second


def test_file_system_errors_become_image_errors(source: SourceImage, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    builder = ImageBuilder(source)
    builder.copy_layer(source.layers[0])
    for target in (f"oci-archive:{blocker}/out.tar", f"oci:{blocker}/layout"):
        with pytest.raises(ImageError, match="failed: "):
            builder.commit(target)
    assert blocker.read_text() == "not a directory"


def test_layout_links_the_blobs_the_builder_wrote(source: SourceImage, tmp_path: Path) -> None:
    builder = ImageBuilder(source)
    builder.copy_layer_without(source.layers[0], ["/srv"])
    builder.add_layer(lambda w: w.add_bytes("/x", b"x" * 5000), created_by="added")
    builder.commit(f"oci:{tmp_path / 'out'}:v1")
    kept, added = builder.build().layers
    blob_dir = tmp_path / "out" / "blobs" / "sha256"
    added_blob = blob_dir / added.digest.split(":", 1)[1]
    assert added.path is not None
    assert added_blob.stat().st_ino == added.path.stat().st_ino
    assert digest(added_blob.read_bytes()) == added.digest
    assert kept.path is None
    assert digest((blob_dir / kept.digest.split(":", 1)[1]).read_bytes()) == kept.digest
