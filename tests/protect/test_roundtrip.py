"""Sealing a tree and unsealing it gives back the same tree: content, links and metadata."""

from __future__ import annotations

import os
import random
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclavify import crypto
from enclavify.protect import CHUNK_SIZE, seal_tree, sealed_size, unseal_tree
from tests.protect.trees import IS_ROOT, Node, assert_same_tree, build, file_digest, write_streaming

REGIONS = ["/app", "/srv/data"]

names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\x00"),
    min_size=1,
    max_size=16,
).filter(lambda name: name not in (".", "..") and len(name.encode()) <= 255)

sizes = st.one_of(
    st.sampled_from([0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE]),
    st.integers(min_value=0, max_value=3 * CHUNK_SIZE + 17),
)
file_modes = st.sampled_from([0o644, 0o600, 0o755, 0o400, 0o4755, 0o2750, 0o1644, 0o777])
dir_modes = st.sampled_from([0o755, 0o700, 0o555, 0o1777, 0o2775])
owners = st.sampled_from([0, 1000, 65534]) if IS_ROOT else st.just(os.getuid())
mtimes = st.integers(min_value=0, max_value=(1 << 31) - 1).map(lambda s: s * 10**9 + 123_456_000)


@st.composite
def files(draw: st.DrawFn) -> Node:
    size = draw(sizes)
    seed = draw(st.integers(0, 2**32))
    return Node(
        "file",
        mode=draw(file_modes),
        content=random.Random(seed).randbytes(size),
        uid=draw(owners),
        gid=draw(owners),
        mtime_ns=draw(mtimes),
    )


@st.composite
def symlinks(draw: st.DrawFn) -> Node:
    target = draw(st.one_of(names, st.sampled_from(["/etc/passwd", "../../..", "sub/x", "."])))
    return Node("symlink", target=target, uid=draw(owners), gid=draw(owners), mtime_ns=draw(mtimes))


def directories(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    return st.builds(
        lambda entries, mode, uid, gid, mtime_ns: Node(
            "dir", mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns, children=entries
        ),
        st.dictionaries(names, children, max_size=5),
        dir_modes,
        owners,
        owners,
        mtimes,
    )


trees = directories(st.recursive(st.one_of(files(), symlinks()), directories, max_leaves=12))


def add_hardlinks(node: Node, rng: random.Random) -> None:
    """Give some files a second name in the same directory."""
    for name, child in list(node.children.items()):
        if child.kind == "dir":
            add_hardlinks(child, rng)
        elif child.kind == "file" and rng.random() < 0.3:
            link = f"{name}.link"
            if link not in node.children and len(link.encode()) <= 255:
                node.children[link] = Node("hardlink", target=name)


def make_source(root: Path, app: Node, data: Node) -> None:
    (root / "srv").mkdir(parents=True)
    build(root / "app", app)
    build(root / "srv" / "data", data)


def round_trip(tmp: Path, source: Path) -> Path:
    volume = seal_tree(source, REGIONS, tmp / "sealed")
    target = tmp / "target"
    target.mkdir()
    unseal_tree(tmp / "sealed", volume.key, volume.tag, target)
    return target


@pytest.fixture
def libcrypto_backend() -> Iterator[None]:
    crypto.select_backend("libcrypto")
    try:
        yield
    finally:
        crypto.select_backend(None)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(app=trees, data=trees, seed=st.integers(0, 2**32))
def test_generated_trees_round_trip(
    tmp_path_factory: pytest.TempPathFactory, app: Node, data: Node, seed: int
) -> None:
    tmp = tmp_path_factory.mktemp("tree")
    add_hardlinks(app, random.Random(seed))
    make_source(tmp / "source", app, data)

    target = round_trip(tmp, tmp / "source")

    assert_same_tree(tmp / "source" / "app", target / "app")
    assert_same_tree(tmp / "source" / "srv" / "data", target / "srv" / "data")


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE, 5 * CHUNK_SIZE + 7],
)
def test_file_at_chunk_boundary_round_trips(tmp_path: Path, size: int) -> None:
    source = tmp_path / "source"
    make_source(
        source,
        Node("dir", mode=0o755, children={"f": Node("file", content=os.urandom(size))}),
        Node("dir", mode=0o755),
    )

    target = round_trip(tmp_path, source)

    assert sorted(item.name for item in (tmp_path / "sealed").iterdir()) == ["fspf", "pack"]
    assert (tmp_path / "sealed" / "pack").stat().st_size == sealed_size(size)
    assert (target / "app" / "f").read_bytes() == (source / "app" / "f").read_bytes()


def test_sparse_file_round_trips(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_source(source, Node("dir", mode=0o755), Node("dir", mode=0o755))
    sparse = source / "app" / "sparse"
    with open(sparse, "wb") as stream:
        stream.seek(3 * CHUNK_SIZE + 100)
        stream.write(b"middle")
        stream.truncate(7 * CHUNK_SIZE)

    target = round_trip(tmp_path, source)

    assert file_digest(target / "app" / "sparse") == file_digest(sparse)
    assert (target / "app" / "sparse").stat().st_size == 7 * CHUNK_SIZE


def test_odd_names_round_trip(tmp_path: Path) -> None:
    odd = [
        "ünïcødé ✓.txt",
        "line\nbreak",
        " leading space",
        "-dash",
        ".hidden",
        "back\\slash",
        "x" * 255,
        "é" * 127,
        "emoji-🔐",
    ]
    source = tmp_path / "source"
    make_source(
        source,
        Node(
            "dir", mode=0o755, children={name: Node("file", content=name.encode()) for name in odd}
        ),
        Node("dir", mode=0o755, children={"日本語": Node("dir", children={"ß": Node("file")})}),
    )

    target = round_trip(tmp_path, source)

    assert_same_tree(source / "app", target / "app")
    assert_same_tree(source / "srv" / "data", target / "srv" / "data")


def test_name_that_is_not_utf8_round_trips(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_source(source, Node("dir", mode=0o755), Node("dir", mode=0o755))
    raw = os.fsencode(source / "app") + b"/caf\xe9-\xff.bin"
    with open(raw, "wb") as stream:
        stream.write(b"latin-1 name")

    target = round_trip(tmp_path, source)

    restored = os.fsencode(target / "app") + b"/caf\xe9-\xff.bin"
    with open(restored, "rb") as stream:
        assert stream.read() == b"latin-1 name"


def test_sealed_volume_reveals_nothing_of_paths(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_source(
        source,
        Node(
            "dir",
            children={
                "secret-plan.txt": Node("file", content=b"a"),
                "b": Node("file", content=b"a"),
            },
        ),
        Node("dir"),
    )

    seal_tree(source, REGIONS, tmp_path / "sealed")

    # Same content, different files: nothing links the objects to each other or to a path.
    pack = (tmp_path / "sealed" / "pack").read_bytes()
    assert len(pack) == 2 * sealed_size(1)
    assert pack[: sealed_size(1)] != pack[sealed_size(1) :]
    assert b"secret" not in pack
    assert b"secret" not in (tmp_path / "sealed" / "fspf").read_bytes()


def test_unseal_with_libcrypto_backend(tmp_path: Path, libcrypto_backend: None) -> None:
    source = tmp_path / "source"
    make_source(
        source,
        Node(
            "dir",
            children={
                "big": Node("file", content=os.urandom(4 * CHUNK_SIZE + 3)),
                "empty": Node("file"),
                "big.link": Node("hardlink", target="big"),
                "up": Node("symlink", target="../.."),
            },
        ),
        Node("dir", mode=0o700),
    )
    crypto.select_backend("cryptography")
    volume = seal_tree(source, REGIONS, tmp_path / "sealed")
    crypto.select_backend("libcrypto")
    target = tmp_path / "target"
    target.mkdir()

    unseal_tree(tmp_path / "sealed", volume.key, volume.tag, target)

    assert crypto.backend_name() == "libcrypto"
    assert_same_tree(source / "app", target / "app")
    assert_same_tree(source / "srv" / "data", target / "srv" / "data")


def test_unseal_creates_missing_parents_of_regions(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_source(source, Node("dir", mode=0o750), Node("dir", mode=0o700))

    target = round_trip(tmp_path, source)

    assert (target / "srv").is_dir()
    assert oct((target / "srv" / "data").stat().st_mode & 0o7777) == oct(0o700)
    assert oct((target / "app").stat().st_mode & 0o7777) == oct(0o750)


def test_unseal_replaces_files_already_in_target(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_source(source, Node("dir", children={"f": Node("file", content=b"new")}), Node("dir"))
    target = tmp_path / "target"
    (target / "app").mkdir(parents=True)
    (target / "app" / "f").write_bytes(b"old")
    volume = seal_tree(source, REGIONS, tmp_path / "sealed")

    unseal_tree(tmp_path / "sealed", volume.key, volume.tag, target)

    assert (target / "app" / "f").read_bytes() == b"new"


@pytest.mark.skipif(not IS_ROOT, reason="restoring owners needs root")
def test_owners_restored_when_root(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_source(
        source,
        Node(
            "dir",
            uid=123,
            gid=456,
            children={
                "f": Node("file", uid=1000, gid=2000, mode=0o4750),
                "l": Node("symlink", target="f", uid=7, gid=8),
            },
        ),
        Node("dir"),
    )

    target = round_trip(tmp_path, source)

    assert (os.stat(target / "app").st_uid, os.stat(target / "app").st_gid) == (123, 456)
    info = os.stat(target / "app" / "f")
    assert (info.st_uid, info.st_gid) == (1000, 2000)
    # chown clears set-user-ID, so the mode must be set after the owner.
    assert oct(info.st_mode & 0o7777) == oct(0o4750)
    link = os.lstat(target / "app" / "l")
    assert (link.st_uid, link.st_gid) == (7, 8)


BIG_SIZE = 100 * 1000 * 1000 + 12345
MEMORY_LIMIT = 8 << 20


@pytest.mark.slow
def test_large_file_streams_in_bounded_memory(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_source(source, Node("dir"), Node("dir"))
    digest = write_streaming(source / "app" / "big.bin", BIG_SIZE)

    tracemalloc.start()
    try:
        started = time.perf_counter()
        volume = seal_tree(source, REGIONS, tmp_path / "sealed")
        seal_seconds = time.perf_counter() - started
        _, seal_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()

        target = tmp_path / "target"
        target.mkdir()
        started = time.perf_counter()
        unseal_tree(tmp_path / "sealed", volume.key, volume.tag, target)
        unseal_seconds = time.perf_counter() - started
        _, unseal_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    print(
        f"100 MB file: seal {BIG_SIZE / seal_seconds / 1e6:.0f} MB/s, "
        f"unseal {BIG_SIZE / unseal_seconds / 1e6:.0f} MB/s, "
        f"peak traced memory {seal_peak / 2**20:.1f} / {unseal_peak / 2**20:.1f} MiB"
    )
    assert seal_peak < MEMORY_LIMIT
    assert unseal_peak < MEMORY_LIMIT
    assert file_digest(target / "app" / "big.bin") == digest


def test_hardlink_between_deep_directories_round_trips(tmp_path: Path) -> None:
    # Deeper than the unsealer's cache of open directories, so its entries get evicted.
    source = tmp_path / "source"
    make_source(source, Node("dir"), Node("dir"))
    first = source / "app" / "/".join(["a"] * 40)
    second = source / "app" / "/".join(["b"] * 40)
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    (first / "file").write_bytes(b"shared")
    os.link(first / "file", second / "link")

    target = round_trip(tmp_path, source)

    restored = target / "app" / "/".join(["a"] * 40) / "file"
    link = target / "app" / "/".join(["b"] * 40) / "link"
    assert link.read_bytes() == b"shared"
    assert os.stat(link).st_ino == os.stat(restored).st_ino
    assert_same_tree(source / "app", target / "app")


def test_short_reads_and_writes_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source"
    files = {f"f{size}": Node("file", content=os.urandom(size)) for size in (0, 1, 999, 70000)}
    make_source(source, Node("dir", children=files), Node("dir"))
    volume = seal_tree(source, REGIONS, tmp_path / "sealed")
    real_preadv, real_write = os.preadv, os.write
    calls = {"preadv": 0, "write": 0}

    def short_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls["preadv"] += 1
        return real_preadv(fd, [buffers[0][:1000]], offset)

    def short_write(fd: int, data: memoryview) -> int:
        calls["write"] += 1
        return real_write(fd, data[:1000])

    monkeypatch.setattr(os, "preadv", short_preadv)
    monkeypatch.setattr(os, "write", short_write)
    target = tmp_path / "target"
    target.mkdir()
    unseal_tree(tmp_path / "sealed", volume.key, volume.tag, target)
    monkeypatch.undo()

    assert calls["preadv"] > 70
    assert calls["write"] > 70
    assert_same_tree(source / "app", target / "app")
