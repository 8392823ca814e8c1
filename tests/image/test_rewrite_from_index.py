"""A rewritten layer is cut from the source tar by its index: every kept member byte for byte."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavify.image import ImageBuilder, SourceImage, open_image

from .conftest import OpenLayers
from .helpers import (
    device,
    directory,
    file,
    hardlink,
    symlink,
    tar_bytes,
    write_docker_archive,
)

LONG = "keep/" + "n" * 150 + ".txt"  # longer than ustar allows: a PAX header carries it

LAYER = tar_bytes(
    [
        directory("."),
        directory("keep"),
        file("keep/plain.txt", b"kept"),
        file(LONG, b"long name"),
        directory("secret"),
        file("secret/data", b"secret content"),
        symlink("secret/link", "data"),
        hardlink("keep/hard-to-secret", "secret/data"),
        hardlink("keep/hard-to-link", "secret/link"),
        hardlink("keep/hard-to-kept", "keep/plain.txt"),
        symlink("keep/soft", "plain.txt"),
        device("keep/null"),
    ]
)


def _members(raw: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    found = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in tar:
            stream = tar.extractfile(member) if member.isreg() else None
            found[member.name] = (member, stream.read() if stream else None)
    return found


@pytest.fixture(params=["gzip layout", "plain layout", "docker archive"])
def source(
    request: pytest.FixtureRequest, open_layers: OpenLayers, tmp_path: Path, workdir: Path
) -> Iterator[SourceImage]:
    """The layer opened from a copy in the work directory, and in place at two offsets."""
    if request.param == "docker archive":
        archive = tmp_path / "d.tar"
        write_docker_archive(archive, [LAYER])
        with open_image(f"docker-archive:{archive}", workdir=workdir) as image:
            assert image.layers[0].tar_offset > 0
            yield image
        return
    compression = "gzip" if request.param == "gzip layout" else "none"
    yield open_layers([LAYER], compression=compression)


def test_rewrite_keeps_members_exactly_and_materializes_links(source: SourceImage) -> None:
    builder = ImageBuilder(source)
    assert builder.copy_layer_without(source.layers[0], ["/secret"]) is True
    with builder.build().layers[0].open_uncompressed() as stream:
        raw = stream.read()

    before = _members(LAYER)
    after = _members(raw)
    assert raw.endswith(b"\0" * 1024)
    assert "secret/data" not in after
    assert "secret/link" not in after
    assert "secret" in after  # the mount point stays
    assert "keep/null" not in after  # a rewritten layer drops device nodes
    for name in (".", "keep", "keep/plain.txt", LONG, "keep/hard-to-kept", "keep/soft"):
        rewritten, content = after[name]
        original, original_content = before[name]
        assert rewritten.get_info() == original.get_info(), name
        assert content == original_content, name
    # The kept members' bytes are the source's own: each appears unchanged in the output.
    for name in ("keep/plain.txt", LONG):
        member = before[name][0]
        end = member.offset_data + ((member.size + 511) // 512) * 512
        assert LAYER[member.offset : end] in raw

    copied, content = after["keep/hard-to-secret"]
    assert copied.isreg()
    assert content == b"secret content"
    relinked, _ = after["keep/hard-to-link"]
    assert relinked.issym()
    assert relinked.linkname == "data"
    assert after["keep/hard-to-kept"][0].islnk()
