"""The runtime cache: equal builds are reused, changed inputs and damaged entries are not."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from enclavify.attest.measurement import runtime_digest
from enclavify.attest.treehash import tree_entries
from enclavify.runtime import builder, cache
from enclavify.runtime.builder import DirectoryFiles, RuntimeInfo, build_runtime
from enclavify.runtime.cache import build_runtime_cached, default_cache_dir

HOST_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def source_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the enclavify package: builds compare equal even while the tree is edited."""
    root = tmp_path_factory.mktemp("sources")
    shutil.copytree(
        builder.SOURCE_ROOT / "enclavify",
        root / "enclavify",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return root


@pytest.fixture(autouse=True)
def _carry_the_snapshot(source_snapshot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "SOURCE_ROOT", source_snapshot)


@pytest.fixture
def host_files() -> DirectoryFiles:
    if not Path(HOST_PYTHON).exists():
        pytest.skip("this machine has no /usr/bin/python3 to build a runtime from")
    return DirectoryFiles(Path("/"))


def _build(
    files: DirectoryFiles, output: Path, cache_dir: Path, source: str = "host"
) -> tuple[RuntimeInfo, bool]:
    built = build_runtime_cached(
        files, output, source=source, cache_dir=cache_dir, python=HOST_PYTHON
    )
    # The digest is taken from the listing instead of the tree, so the two must be equal.
    if built.listing is not None:
        assert built.listing == tree_entries(output)
    return built.info, built.cached


def _entries(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.iterdir() if len(p.name) == 64]


def _stdlib_file(info: RuntimeInfo, name: str) -> str:
    version = ".".join(info.python_version.split(".")[:2])
    return f"/usr/lib/python{version}/{name}"


class _EditedFiles(DirectoryFiles):
    """The host root with one file's content changed, as a new image layer would change it."""

    def __init__(self, root: Path, path: str, suffix: bytes) -> None:
        super().__init__(root)
        self.edited = path
        self.suffix = suffix

    def open(self, path: str) -> IO[bytes]:
        with super().open(path) as stream:
            data = stream.read()
        if self.resolve(path) == self.edited:
            data += self.suffix
        return io.BytesIO(data)


class _KeyedFiles(DirectoryFiles):
    """The host root with content keys, as an image's merged view has, counting file reads."""

    def __init__(self, root: Path, *, unchanged: bool = True) -> None:
        super().__init__(root)
        self.opened: list[str] = []
        self.unchanged = unchanged

    def sources_unchanged(self) -> bool:
        return self.unchanged

    def content_key(self, path: str) -> str | None:
        resolved = self.resolve(path)
        return None if resolved is None else f"host:{resolved}"

    def open(self, path: str) -> IO[bytes]:
        self.opened.append(path)
        return super().open(path)


def test_known_contents_are_not_read_again(host_files: DirectoryFiles, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cold_files = _KeyedFiles(Path("/"))
    _build(cold_files, tmp_path / "cold", cache_dir)
    contents = json.loads((cache_dir / "contents.json").read_text())
    assert cold_files.opened
    assert set(contents) == {cold_files.content_key(path) for path in cold_files.opened}

    warm_files = _KeyedFiles(Path("/"))
    _, cached = _build(warm_files, tmp_path / "warm", cache_dir)

    assert cached
    assert warm_files.opened == []
    assert runtime_digest(tmp_path / "warm") == runtime_digest(tmp_path / "cold")


def test_changed_sources_keep_no_digests(host_files: DirectoryFiles, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    changed = _KeyedFiles(Path("/"), unchanged=False)
    _build(changed, tmp_path / "cold", cache_dir)
    assert changed.opened
    assert not (cache_dir / "contents.json").exists()


def test_unwritable_contents_file_is_no_error(
    host_files: DirectoryFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    _build(_KeyedFiles(Path("/")), tmp_path / "cold", cache_dir)
    (cache_dir / "contents.json").unlink()

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError("read-only file system")

    monkeypatch.setattr(cache.atomic, "write_bytes", read_only)
    _, cached = _build(_KeyedFiles(Path("/")), tmp_path / "warm", cache_dir)

    assert cached
    assert not (cache_dir / "contents.json").exists()


def test_wrong_content_digest_rebuilds(host_files: DirectoryFiles, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _build(_KeyedFiles(Path("/")), tmp_path / "cold", cache_dir)
    contents_file = cache_dir / "contents.json"
    contents = json.loads(contents_file.read_text())
    contents_file.write_text(json.dumps(dict.fromkeys(contents, "0" * 64)))

    _, cached = _build(_KeyedFiles(Path("/")), tmp_path / "rebuilt", cache_dir)

    # A wrong digest matches no entry: the runtime is built from the files themselves.
    assert not cached
    assert runtime_digest(tmp_path / "rebuilt") == runtime_digest(tmp_path / "cold")
    assert json.loads(contents_file.read_text()) == contents
    contents_file.write_text("{not json")
    _, cached = _build(_KeyedFiles(Path("/")), tmp_path / "again", cache_dir)
    assert cached
    assert json.loads(contents_file.read_text()) == contents


def test_cached_build_is_identical(
    host_files: DirectoryFiles, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    first, first_cached = _build(host_files, tmp_path / "first", cache_dir)
    second, second_cached = _build(host_files, tmp_path / "second", cache_dir, source="base X")
    plain = build_runtime(host_files, tmp_path / "plain", python=HOST_PYTHON, source="host")

    assert (first_cached, second_cached) == (False, True)
    assert len(_entries(cache_dir)) == 1
    digest = runtime_digest(tmp_path / "plain")
    assert runtime_digest(tmp_path / "first") == digest
    assert runtime_digest(tmp_path / "second") == digest
    assert first == plain
    # Where the interpreter came from is this conversion's, not the stored build's.
    assert second.source == "base X"
    assert second.to_json() == {**plain.to_json(), "source": "base X"}


def test_changed_image_file_misses(host_files: DirectoryFiles, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    info, _ = _build(host_files, tmp_path / "first", cache_dir)
    module = _stdlib_file(info, "os.py")
    edited = _EditedFiles(Path("/"), module, b"\n# changed in a later layer\n")

    changed, cached = _build(edited, tmp_path / "changed", cache_dir)

    assert not cached
    assert len(_entries(cache_dir)) == 2
    carried = tmp_path / "changed" / "lib" / Path(module).parent.name / "os.py"
    assert carried.read_bytes().endswith(b"# changed in a later layer\n")
    assert runtime_digest(tmp_path / "changed") != runtime_digest(tmp_path / "first")
    # Both variants stay usable: each image finds its own entry.
    _, again = _build(host_files, tmp_path / "again", cache_dir)
    assert again
    assert changed.size == info.size + len(b"\n# changed in a later layer\n")


def test_damaged_entry_is_rebuilt(
    host_files: DirectoryFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    info, _ = _build(host_files, tmp_path / "first", cache_dir)
    expected = runtime_digest(tmp_path / "first")
    (entry,) = _entries(cache_dir)
    version = ".".join(info.python_version.split(".")[:2])
    # The entry may share its files with the first tree (hard links): the damage shows in both.
    with open(entry / "tree" / "lib" / f"python{version}" / "os.py", "ab") as stream:
        stream.write(b"\nraise SystemExit('tampered')\n")

    with caplog.at_level(logging.DEBUG, logger="enclavify.runtime.cache"):
        _, cached = _build(host_files, tmp_path / "second", cache_dir)

    assert not cached
    assert "damaged" in caplog.text
    carried = tmp_path / "second" / "lib" / f"python{version}" / "os.py"
    assert b"tampered" not in carried.read_bytes()
    assert runtime_digest(tmp_path / "second") == expected
    # The rebuilt entry replaced the damaged one and is used from now on.
    _, cached = _build(host_files, tmp_path / "third", cache_dir)
    assert cached


@pytest.mark.parametrize("damage", ["missing", "garbage", "missing-file"])
def test_incomplete_entry_is_rebuilt(
    host_files: DirectoryFiles, tmp_path: Path, damage: str
) -> None:
    cache_dir = tmp_path / "cache"
    _build(host_files, tmp_path / "first", cache_dir)
    (entry,) = _entries(cache_dir)
    if damage == "missing":
        (entry / "entry.json").unlink()
    elif damage == "garbage":
        (entry / "entry.json").write_text('{"format": 1, "info": {')
    else:
        shutil.rmtree(entry / "tree" / "bin")

    _, cached = _build(host_files, tmp_path / "second", cache_dir)

    assert not cached
    assert runtime_digest(tmp_path / "second") == runtime_digest(tmp_path / "first")
    _, cached = _build(host_files, tmp_path / "third", cache_dir)
    assert cached


def test_carried_sources_decide_the_key(
    host_files: DirectoryFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = tmp_path / "sources"
    shutil.copytree(builder.SOURCE_ROOT / "enclavify", sources / "enclavify")
    monkeypatch.setattr(builder, "SOURCE_ROOT", sources)
    cache_dir = tmp_path / "cache"
    _build(host_files, tmp_path / "first", cache_dir)

    # A module the launcher does not carry: the stored runtime still fits.
    server = sources / "enclavify" / "cas" / "server.py"
    server.write_text(server.read_text() + "\n# an edit of the CAS server\n")
    _, cached = _build(host_files, tmp_path / "unrelated", cache_dir)
    assert cached

    # A developer's edit of the launcher gives a fresh runtime that carries it.
    launcher = sources / "enclavify" / "runtime" / "launcher.py"
    launcher.write_text(launcher.read_text() + "\n# a developer's edit\n")
    _, cached = _build(host_files, tmp_path / "edited", cache_dir)
    assert not cached
    carried = next((tmp_path / "edited" / "lib").glob("python*/enclavify/runtime/launcher.py"))
    assert carried.read_text().endswith("# a developer's edit\n")

    # A new module in a carried package may now satisfy an optional import.
    (sources / "enclavify" / "protect" / "aead.py").write_text('"""Added."""\n')
    _, cached = _build(host_files, tmp_path / "added", cache_dir)
    assert not cached
    _, cached = _build(host_files, tmp_path / "again", cache_dir)
    assert cached


def test_host_key_depends_on_the_python_option() -> None:
    assert cache._host_key(HOST_PYTHON) != cache._host_key(None)
    assert cache._host_key(None) == cache._host_key(None)


_CONCURRENT = """
import sys
from pathlib import Path
from enclavify.runtime import builder
from enclavify.runtime.builder import DirectoryFiles
from enclavify.runtime.cache import build_runtime_cached
builder.SOURCE_ROOT = Path(sys.argv[3])
built = build_runtime_cached(
    DirectoryFiles(Path("/")), Path(sys.argv[1]), source="host", cache_dir=Path(sys.argv[2]),
    python="/usr/bin/python3",
)
print(built.cached)
"""


def test_concurrent_builds_leave_one_whole_entry(
    host_files: DirectoryFiles, tmp_path: Path, source_snapshot: Path
) -> None:
    cache_dir = tmp_path / "cache"
    processes = [
        subprocess.Popen(
            [
                sys.executable, "-c", _CONCURRENT,
                str(tmp_path / f"out{n}"), str(cache_dir), str(source_snapshot),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    for process in processes:
        _out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    assert runtime_digest(tmp_path / "out0") == runtime_digest(tmp_path / "out1")
    assert len(_entries(cache_dir)) == 1
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]
    _, cached = _build(host_files, tmp_path / "third", cache_dir)
    assert cached
    assert runtime_digest(tmp_path / "third") == runtime_digest(tmp_path / "out0")


def test_least_recently_used_entries_are_pruned(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    names = [f"{n:064x}" for n in range(cache.MAX_ENTRIES + 3)]
    for age, name in enumerate(names):
        (cache_dir / name / "tree").mkdir(parents=True)
        stamp = 1_000_000 + (len(names) - age) * 60
        os.utime(cache_dir / name, (stamp, stamp))
    cache._prune(cache_dir, cache_dir / "lookups")
    kept = sorted(p.name for p in _entries(cache_dir))
    assert kept == sorted(names[: cache.MAX_ENTRIES])
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]


def test_cache_directory_follows_xdg_cache_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "enclavify" / "runtime"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "enclavify" / "runtime"


def test_call_list_names_files_read(host_files: DirectoryFiles, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _build(host_files, tmp_path / "first", cache_dir)
    (lookups,) = (cache_dir / "lookups").iterdir()
    (calls_file,) = lookups.iterdir()
    calls = json.loads(calls_file.read_text())
    opened = {path for op, path in calls if op == "open"}
    assert any(path.endswith("/os.py") for path in opened)
    assert "/etc/hostname" not in opened
