"""The merged view: overlay rules, links and chroot-like symlink resolution."""

from __future__ import annotations

import tracemalloc

import pytest

from enclavify.errors import ImageError

from .conftest import OpenLayers
from .helpers import directory, file, hardlink, opaque, symlink, tar_bytes, whiteout


def test_upper_layer_hides_lower_file(open_layers: OpenLayers) -> None:
    image = open_layers(
        [
            tar_bytes([directory("etc"), file("etc/conf", b"old"), file("etc/keep", b"k")]),
            tar_bytes([file("etc/conf", b"new")]),
        ]
    )
    files = image.filesystem()
    assert files.read_bytes("/etc/conf") == b"new"
    assert files.read_bytes("/etc/keep") == b"k"
    assert files.entry("/etc/conf") is not None
    assert files.entry("/etc/conf").layer == 1  # type: ignore[union-attr]


def test_whiteout_deletes_subtree_of_lower_layers(open_layers: OpenLayers) -> None:
    image = open_layers(
        [
            tar_bytes(
                [
                    directory("app"),
                    directory("app/lib"),
                    file("app/lib/x.py", b"x"),
                    file("app/main.py", b"m"),
                ]
            ),
            tar_bytes([whiteout("app", "lib")]),
        ]
    )
    files = image.filesystem()
    assert files.entry("/app/lib") is None
    assert files.entry("/app/lib/x.py") is None
    assert files.listdir("/app") == ["main.py"]


def test_whiteout_applies_only_below_its_own_layer(open_layers: OpenLayers) -> None:
    # The whiteout comes after the new file in tar order; it still only hides the old one.
    image = open_layers(
        [
            tar_bytes([file("data", b"old")]),
            tar_bytes([file("data", b"new"), whiteout("", "data")]),
        ]
    )
    assert image.filesystem().read_bytes("/data") == b"new"


def test_opaque_directory_hides_lower_contents(open_layers: OpenLayers) -> None:
    image = open_layers(
        [
            tar_bytes([directory("srv"), file("srv/a", b"a"), file("srv/b", b"b")]),
            tar_bytes([directory("srv"), opaque("srv"), file("srv/c", b"c")]),
        ]
    )
    assert image.filesystem().listdir("/srv") == ["c"]


def test_directory_over_directory_merges(open_layers: OpenLayers) -> None:
    image = open_layers(
        [
            tar_bytes([directory("opt", 0o700), file("opt/a", b"a")]),
            tar_bytes([directory("opt", 0o755), file("opt/b", b"b")]),
        ]
    )
    files = image.filesystem()
    assert files.listdir("/opt") == ["a", "b"]
    assert files.entry("/opt").mode == 0o755  # type: ignore[union-attr]


def test_file_over_directory_replaces_it(open_layers: OpenLayers) -> None:
    image = open_layers(
        [tar_bytes([directory("x"), file("x/inner", b"i")]), tar_bytes([file("x", b"file")])]
    )
    files = image.filesystem()
    assert files.entry("/x").type == "file"  # type: ignore[union-attr]
    assert files.entry("/x/inner") is None


def test_entry_below_lower_symlink_makes_a_directory(open_layers: OpenLayers) -> None:
    # Layers are unpacked separately and stacked, so lib/x never lands in usr/lib.
    image = open_layers(
        [
            tar_bytes([directory("usr"), directory("usr/lib"), symlink("lib", "usr/lib")]),
            tar_bytes([file("lib/x", b"x")]),
        ]
    )
    files = image.filesystem()
    assert files.entry("/lib").type == "dir"  # type: ignore[union-attr]
    assert files.listdir("/usr/lib") == []
    assert files.read_bytes("/lib/x") == b"x"


def test_hardlink_shares_content_within_layer(open_layers: OpenLayers) -> None:
    image = open_layers(
        [
            tar_bytes(
                [
                    directory("bin"),
                    file("bin/python3.11", b"ELF..."),
                    hardlink("bin/python3", "bin/python3.11"),
                ]
            )
        ]
    )
    files = image.filesystem()
    link = files.entry("/bin/python3")
    assert link is not None
    assert link.type == "hardlink"
    assert link.linkname == "/bin/python3.11"
    assert files.read_bytes("/bin/python3") == b"ELF..."


def test_hardlink_whose_target_is_whited_out_becomes_file(open_layers: OpenLayers) -> None:
    image = open_layers(
        [
            tar_bytes([file("a", b"content"), hardlink("b", "a")]),
            tar_bytes([whiteout("", "a")]),
        ]
    )
    files = image.filesystem()
    entry = files.entry("/b")
    assert entry is not None
    assert entry.type == "file"
    assert files.read_bytes("/b") == b"content"


def test_resolve_treats_absolute_targets_as_image_root(open_layers: OpenLayers) -> None:
    image = open_layers(
        [
            tar_bytes(
                [
                    directory("etc"),
                    file("etc/passwd", b"image passwd"),
                    directory("app"),
                    symlink("app/passwd", "/etc/passwd"),
                    symlink("app/up", "../../../../etc/passwd"),
                    symlink("app/dir", "/etc"),
                ]
            )
        ]
    )
    files = image.filesystem()
    assert files.resolve("/app/passwd") == "/etc/passwd"
    assert files.resolve("/app/up") == "/etc/passwd"
    assert files.resolve("/app/dir/passwd") == "/etc/passwd"
    assert files.resolve("/../../etc/passwd") == "/etc/passwd"
    assert files.read_bytes("/app/up") == b"image passwd"
    assert files.resolve("/app/passwd", follow_final=False) == "/app/passwd"


def test_resolve_returns_none_for_missing_paths(open_layers: OpenLayers) -> None:
    image = open_layers([tar_bytes([file("f", b"x"), symlink("dangling", "/nowhere")])])
    files = image.filesystem()
    assert files.resolve("/missing") is None
    assert files.resolve("/f/below-a-file") is None
    assert files.resolve("/dangling") is None
    with pytest.raises(ImageError, match="does not exist"):
        files.open("/dangling")


def test_symlink_loop_is_reported(open_layers: OpenLayers) -> None:
    image = open_layers([tar_bytes([symlink("a", "b"), symlink("b", "/a")])])
    with pytest.raises(ImageError, match="too many levels of symbolic links"):
        image.filesystem().resolve("/a")


def test_walk_lists_directories_before_contents(open_layers: OpenLayers) -> None:
    image = open_layers(
        [
            tar_bytes(
                [
                    directory("app"),
                    directory("app/z"),
                    file("app/z/1"),
                    file("app/a"),
                    symlink("app/l", "a"),
                ]
            )
        ]
    )
    paths = [entry.path for entry in image.filesystem().walk("/app")]
    assert paths == ["/app", "/app/a", "/app/l", "/app/z", "/app/z/1"]
    assert list(image.filesystem().walk("/missing")) == []


def test_open_rejects_directories(open_layers: OpenLayers) -> None:
    image = open_layers([tar_bytes([directory("d")])])
    with pytest.raises(ImageError, match="not a regular file"):
        image.filesystem().open("/d")
    with pytest.raises(ImageError, match="not a directory"):
        open_layers([tar_bytes([file("f")])]).filesystem().listdir("/f")


def test_open_reads_large_file_in_place(open_layers: OpenLayers) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    image = open_layers([tar_bytes([file("big", data), file("after", b"tail")])])
    files = image.filesystem()
    with files.open("/big") as stream:
        stream.seek(1_000_000)
        assert stream.read(10) == data[1_000_000:1_000_010]
        stream.seek(0)
        assert stream.read() == data
    assert files.read_bytes("/after") == b"tail"


def test_metadata_is_reported(open_layers: OpenLayers) -> None:
    image = open_layers([tar_bytes([file("s", b"x", mode=0o4755, uid=1000)])])
    entry = image.filesystem().entry("/s")
    assert entry is not None
    assert (entry.mode, entry.uid, entry.size, entry.mtime) == (0o4755, 1000, 1, 1_700_000_000)


def test_open_uses_constant_memory(open_layers: OpenLayers) -> None:
    size = 32 * 1024 * 1024
    image = open_layers([tar_bytes([file("big", b"\x5a" * size)])], compression="none")
    files = image.filesystem()
    tracemalloc.start()
    try:
        read = 0
        with files.open("/big") as stream:
            while chunk := stream.read(65536):
                read += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert read == size
    assert peak < 4 * 1024 * 1024, f"reading used {peak} bytes at peak"


def test_content_key_names_layer_bytes(open_layers: OpenLayers) -> None:
    base = tar_bytes([file("lib/a", b"same"), file("lib/b", b"other"), symlink("lib/c", "a")])
    image = open_layers([base, tar_bytes([file("lib/b", b"upper"), hardlink("lib/d", "lib/b")])])
    view = image.filesystem()
    lower, upper = image.layers
    key_a = view.content_key("/lib/a")
    assert key_a is not None
    assert key_a.startswith(f"{lower.diff_id}@")
    assert key_a.endswith("+4")
    # A symlink names its target's bytes; a hardlink shares them.
    assert view.content_key("/lib/c") == key_a
    key_b = view.content_key("/lib/b")
    assert key_b is not None
    assert key_b.startswith(f"{upper.diff_id}@")
    assert view.content_key("/lib/d") == key_b
    # Directories, missing paths and links that lead nowhere have none, as open() raises.
    for path in ("/lib", "/missing", "/lib/a/x"):
        assert view.content_key(path) is None
    # The same layer in another image gives the same names.
    again = open_layers([base]).filesystem()
    assert again.content_key("/lib/a") == key_a
    assert again.content_key("/lib/b") != key_b
