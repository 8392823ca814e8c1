"""An attacker who controls the image's sealed files gets every change rejected.

Each case asserts the IntegrityError names the file (or the fspf, or the pack when the change
is to the pack as a whole), and that no plaintext of the rejected file, not even a temporary
one, is left in the target.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclavify.errors import IntegrityError
from enclavify.protect import CHUNK_SIZE, SealedVolume, open_fspf, seal_tree, unseal, unseal_tree
from enclavify.protect.format import TAG_SIZE, Entry, sealed_size
from tests.protect.trees import seal_manifest

BIG = "/app/big.bin"
TWIN_A = "/app/twin-a.bin"
TWIN_B = "/app/twin-b.bin"
SMALL = "/app/z-small.txt"
BIG_CHUNKS = 5  # 4 full chunks and a partial one
SEALED_CHUNK = CHUNK_SIZE + TAG_SIZE


@dataclass
class Sealed:
    source: Path
    sealed: Path
    volume: SealedVolume
    target: Path

    def entry_of(self, path: str) -> Entry:
        manifest = open_fspf(self.fspf.read_bytes(), self.volume.key, self.volume.tag)
        return next(entry for entry in manifest.entries if entry.path == path)

    def offset_of(self, path: str) -> int:
        """Return where the object of ``path`` starts in the pack."""
        return self.entry_of(path).offset

    def read_object(self, path: str) -> bytes:
        entry = self.entry_of(path)
        return self.pack.read_bytes()[entry.offset : entry.offset + sealed_size(entry.size)]

    def replace_object(self, path: str, data: bytes) -> None:
        """Put ``data`` where the object of ``path`` is; what follows it moves if sizes differ."""
        entry = self.entry_of(path)
        pack = bytearray(self.pack.read_bytes())
        pack[entry.offset : entry.offset + sealed_size(entry.size)] = data
        self.pack.write_bytes(bytes(pack))

    @property
    def fspf(self) -> Path:
        return self.sealed / "fspf"

    @property
    def pack(self) -> Path:
        return self.sealed / "pack"

    def unseal(self, key: bytes | None = None, tag: bytes | None = None) -> None:
        unseal_tree(
            self.sealed,
            self.volume.key if key is None else key,
            self.volume.tag if tag is None else tag,
            self.target,
        )


@pytest.fixture
def sealed(tmp_path: Path) -> Sealed:
    source = tmp_path / "source"
    (source / "app").mkdir(parents=True)
    (source / "app" / "big.bin").write_bytes(os.urandom(4 * CHUNK_SIZE + 1000))
    (source / "app" / "twin-a.bin").write_bytes(os.urandom(2 * CHUNK_SIZE))
    (source / "app" / "twin-b.bin").write_bytes(os.urandom(2 * CHUNK_SIZE))
    (source / "app" / "z-small.txt").write_bytes(b"top secret")
    volume = seal_tree(source, ["/app"], tmp_path / "sealed")
    target = tmp_path / "target"
    target.mkdir()
    return Sealed(source, tmp_path / "sealed", volume, target)


def assert_rejected(sealed: Sealed, path: str) -> None:
    """Unsealing raises an IntegrityError naming ``path`` and leaves no plaintext of it."""
    with pytest.raises(IntegrityError) as excinfo:
        sealed.unseal()
    message = str(excinfo.value)
    assert repr(path) in message
    assert sealed.volume.key.hex() not in message
    assert not (sealed.target / path.lstrip("/")).exists()
    # A pack of the wrong size is rejected before even /app is made.
    leftovers = [item.name for item in sealed.target.rglob("*") if ".tmp" in item.name]
    assert leftovers == []


def assert_pack_rejected(sealed: Sealed) -> None:
    """Unsealing raises an IntegrityError naming the pack and restores nothing."""
    with pytest.raises(IntegrityError) as excinfo:
        sealed.unseal()
    assert repr(str(sealed.pack)) in str(excinfo.value)
    assert list(sealed.target.iterdir()) == []


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)[0]
        stream.seek(offset)
        stream.write(bytes([byte ^ (1 << bit)]))


def test_untampered_volume_unseals(sealed: Sealed) -> None:
    sealed.unseal()

    for path in (BIG, TWIN_A, TWIN_B, SMALL):
        relative = path.lstrip("/")
        assert (sealed.target / relative).read_bytes() == (sealed.source / relative).read_bytes()


@pytest.mark.parametrize("chunk", range(BIG_CHUNKS))
@pytest.mark.parametrize("where", ["first byte", "middle", "tag"])
def test_flipped_bit_in_any_chunk_is_rejected(sealed: Sealed, chunk: int, where: str) -> None:
    start = chunk * SEALED_CHUNK
    size = min(SEALED_CHUNK, len(sealed.read_object(BIG)) - start)
    offset = {"first byte": start, "middle": start + size // 2, "tag": start + size - 1}[where]
    flip_bit(sealed.pack, sealed.offset_of(BIG) + offset, bit=chunk % 8)

    assert_rejected(sealed, BIG)


def test_flipped_bit_in_small_file_is_rejected(sealed: Sealed) -> None:
    flip_bit(sealed.pack, sealed.offset_of(SMALL) + 3)

    assert_rejected(sealed, SMALL)


def test_swapped_chunks_are_rejected(sealed: Sealed) -> None:
    data = bytearray(sealed.read_object(BIG))
    first = data[:SEALED_CHUNK]
    data[:SEALED_CHUNK] = data[SEALED_CHUNK : 2 * SEALED_CHUNK]
    data[SEALED_CHUNK : 2 * SEALED_CHUNK] = first
    sealed.replace_object(BIG, bytes(data))

    assert_rejected(sealed, BIG)


def test_repeated_chunk_is_rejected(sealed: Sealed) -> None:
    data = bytearray(sealed.read_object(BIG))
    data[SEALED_CHUNK : 2 * SEALED_CHUNK] = data[:SEALED_CHUNK]
    sealed.replace_object(BIG, bytes(data))

    assert_rejected(sealed, BIG)


def test_swapped_objects_of_two_files_are_rejected(sealed: Sealed) -> None:
    # Same size, so only the per-file key and file id can tell them apart.
    a_data, b_data = sealed.read_object(TWIN_A), sealed.read_object(TWIN_B)
    sealed.replace_object(TWIN_A, b_data)
    sealed.replace_object(TWIN_B, a_data)

    assert_rejected(sealed, TWIN_A)
    assert not (sealed.target / "app" / "twin-b.bin").exists()


@pytest.mark.parametrize("cut", [1, TAG_SIZE, 1000])
def test_truncated_object_is_rejected(sealed: Sealed, cut: int) -> None:
    # BIG's object is the first in the pack, so every object after it moves too. The error
    # names the first file that no longer verifies, and nothing at all is restored.
    data = sealed.read_object(BIG)
    sealed.replace_object(BIG, data[:-cut])

    assert_rejected(sealed, BIG)
    assert list(sealed.target.iterdir()) == []


def test_truncated_pack_is_rejected(sealed: Sealed) -> None:
    # SMALL's object is the last in the pack.
    data = sealed.pack.read_bytes()
    sealed.pack.write_bytes(data[:-1])

    assert_rejected(sealed, SMALL)


def test_dropped_last_chunk_is_rejected(sealed: Sealed) -> None:
    data = sealed.read_object(TWIN_A)
    sealed.replace_object(TWIN_A, data[:SEALED_CHUNK])

    assert_rejected(sealed, TWIN_A)


def test_appended_data_is_rejected(sealed: Sealed) -> None:
    with open(sealed.pack, "ab") as stream:
        stream.write(b"\x00" * TAG_SIZE)

    assert_pack_rejected(sealed)


def test_missing_pack_is_rejected(sealed: Sealed) -> None:
    sealed.pack.unlink()

    assert_pack_rejected(sealed)


def test_pack_replaced_by_symlink_is_rejected(sealed: Sealed) -> None:
    # A symlink to the genuine pack: the unsealer must not follow it.
    moved = sealed.pack.with_name("elsewhere")
    sealed.pack.rename(moved)
    sealed.pack.symlink_to(moved.name)

    assert_pack_rejected(sealed)


def assert_fspf_rejected(
    sealed: Sealed, key: bytes | None = None, tag: bytes | None = None
) -> None:
    with pytest.raises(IntegrityError) as excinfo:
        sealed.unseal(key=key, tag=tag)
    assert repr(str(sealed.fspf)) in str(excinfo.value)
    assert list(sealed.target.iterdir()) == []


def test_wrong_key_is_rejected(sealed: Sealed) -> None:
    assert_fspf_rejected(sealed, key=os.urandom(32))


def test_wrong_tag_is_rejected(sealed: Sealed) -> None:
    assert_fspf_rejected(sealed, tag=os.urandom(16))


def test_flipped_bit_in_fspf_is_rejected(sealed: Sealed) -> None:
    # Inside the ciphertext, not the tag: the tag still matches, so decryption must catch it.
    flip_bit(sealed.fspf, 40)

    assert_fspf_rejected(sealed)


def test_older_fspf_put_back_is_rejected(sealed: Sealed, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(sealed.sealed, old)
    (sealed.source / "app" / "z-small.txt").write_bytes(b"revoked secret")
    newer = seal_tree(sealed.source, ["/app"], tmp_path / "newer")
    shutil.rmtree(sealed.sealed)
    shutil.copytree(old, sealed.sealed)

    # The attacker restores the old volume; the session has the newer key and tag.
    with pytest.raises(IntegrityError):
        sealed.unseal(key=newer.key, tag=newer.tag)
    assert list(sealed.target.iterdir()) == []


def test_older_fspf_under_same_key_is_rejected(sealed: Sealed) -> None:
    # Even when a later version reuses the volume key, the expected tag pins one fspf.
    manifest = open_fspf(sealed.fspf.read_bytes(), sealed.volume.key, sealed.volume.tag)
    later = seal_manifest(
        {"format": manifest.format, "chunk_size": manifest.chunk_size,
         "regions": list(manifest.regions), "entries": []},
        sealed.volume.key,
    )
    later_tag = later[-TAG_SIZE:]

    with pytest.raises(IntegrityError) as excinfo:
        sealed.unseal(tag=later_tag)

    assert repr(str(sealed.fspf)) in str(excinfo.value)
    assert list(sealed.target.iterdir()) == []


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Sealed:
    root = tmp_path_factory.mktemp("pristine")
    (root / "source" / "app").mkdir(parents=True)
    (root / "source" / "app" / "big.bin").write_bytes(os.urandom(2 * CHUNK_SIZE + 77))
    volume = seal_tree(root / "source", ["/app"], root / "sealed")
    return Sealed(root / "source", root / "sealed", volume, root / "unused")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(min_value=0, max_value=8 * (2 * SEALED_CHUNK + 77 + TAG_SIZE) - 1))
def test_any_flipped_bit_is_rejected(
    pristine: Sealed, tmp_path_factory: pytest.TempPathFactory, position: int
) -> None:
    root = tmp_path_factory.mktemp("flip")
    shutil.copytree(pristine.sealed, root / "sealed")
    (root / "target").mkdir()
    sealed = Sealed(pristine.source, root / "sealed", pristine.volume, root / "target")
    flip_bit(sealed.pack, sealed.offset_of(BIG) + position // 8, position % 8)

    assert_rejected(sealed, BIG)


@pytest.fixture
def many_sealed(tmp_path: Path) -> Sealed:
    """Enough files that the unsealer shares them with forked children."""
    source = tmp_path / "source"
    for index in range(120):
        directory = source / "app" / f"d{index // 10:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        size = 3 * CHUNK_SIZE if index % 7 == 0 else 100 + index
        (directory / f"f{index:03d}").write_bytes(os.urandom(size))
    volume = seal_tree(source, ["/app"], tmp_path / "sealed")
    target = tmp_path / "target"
    target.mkdir()
    return Sealed(source, tmp_path / "sealed", volume, target)


def take_batches_only(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Let only this process ("here") or only the forked children ("child") take batches."""
    this_process = os.getpid()
    real_restore_queued = unseal._Restorer._restore_queued

    def restore_queued(
        self: unseal._Restorer, queue: int, batches: list[list[tuple[str, str, Entry]]]
    ) -> None:
        if (os.getpid() == this_process) == (where == "here"):
            real_restore_queued(self, queue, batches)

    monkeypatch.setattr(unseal._Restorer, "_restore_queued", restore_queued)


@pytest.mark.parametrize("where", ["here", "child"])
@pytest.mark.parametrize("index", [0, 119])
def test_rejection_of_a_file_among_many_names_it(
    many_sealed: Sealed, monkeypatch: pytest.MonkeyPatch, index: int, where: str
) -> None:
    # One file a batch, all restored in this process or all in the one child.
    monkeypatch.setattr(unseal, "_CPUS", 2)
    monkeypatch.setattr(unseal, "_BATCH_WORK", 1)
    take_batches_only(monkeypatch, where)
    path = f"/app/d{index // 10:02d}/f{index:03d}"
    flip_bit(many_sealed.pack, many_sealed.offset_of(path) + 5)

    with pytest.raises(IntegrityError) as excinfo:
        many_sealed.unseal()

    assert repr(path) in str(excinfo.value)
    assert not (many_sealed.target / path.lstrip("/")).exists()
    leftovers = [item for item in (many_sealed.target / "app").rglob("*") if ".tmp" in item.name]
    assert leftovers == []


def _count_forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Return the list to which the pids of the children forked from now on are added."""
    forks = []
    real_fork = os.fork

    def counting_fork() -> int:
        pid = real_fork()
        if pid:
            forks.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", counting_fork)
    return forks


def _assert_reaped(children: list[int]) -> None:
    for child in children:
        with pytest.raises(ChildProcessError):  # already reaped
            os.waitpid(child, os.WNOHANG)


def _assert_all_restored(many_sealed: Sealed) -> None:
    for index in range(120):
        relative = f"app/d{index // 10:02d}/f{index:03d}"
        restored = (many_sealed.target / relative).read_bytes()
        assert restored == (many_sealed.source / relative).read_bytes()


def test_many_files_unseal_alike_in_both_processes(
    many_sealed: Sealed, monkeypatch: pytest.MonkeyPatch
) -> None:
    forks = _count_forks(monkeypatch)
    many_sealed.unseal()

    cpus = len(os.sched_getaffinity(0))
    assert len(forks) == min(cpus, unseal._MAX_PROCESSES) - 1
    _assert_all_restored(many_sealed)


@pytest.mark.timeout(10)
def test_pack_replaced_by_fifo_is_rejected_without_blocking(sealed: Sealed) -> None:
    # Opening a FIFO for reading blocks until a writer appears; the unsealer must not wait.
    sealed.pack.unlink()
    os.mkfifo(sealed.pack)

    assert_pack_rejected(sealed)


@pytest.mark.parametrize("processes", [3, 4])
def test_many_files_unseal_alike_in_more_processes(
    many_sealed: Sealed, monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    monkeypatch.setattr(unseal, "_CPUS", processes)
    # 120 files are enough for 4 processes with at least 16 files each.
    monkeypatch.setattr(unseal, "_FORK_FILES", 32)
    monkeypatch.setattr(unseal, "_BATCH_WORK", 1)

    forks = _count_forks(monkeypatch)
    many_sealed.unseal()

    assert len(forks) == processes - 1
    _assert_reaped(forks)
    _assert_all_restored(many_sealed)


@pytest.mark.parametrize("index", [0, 60, 119])
def test_rejection_among_many_processes_names_the_file(
    many_sealed: Sealed, monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    # Two children share the batches, one file each; this process takes none.
    monkeypatch.setattr(unseal, "_CPUS", 3)
    monkeypatch.setattr(unseal, "_BATCH_WORK", 1)
    take_batches_only(monkeypatch, "child")
    path = f"/app/d{index // 10:02d}/f{index:03d}"
    flip_bit(many_sealed.pack, many_sealed.offset_of(path) + 5)

    forks = _count_forks(monkeypatch)

    with pytest.raises(IntegrityError) as excinfo:
        many_sealed.unseal()

    assert repr(path) in str(excinfo.value)
    assert len(forks) == 2
    _assert_reaped(forks)
    assert not (many_sealed.target / path.lstrip("/")).exists()


def _files(sizes: list[int]) -> list[tuple[str, str, Entry]]:
    return [("/app", f"f{index}", Entry(type="file", path=f"/app/f{index}", size=size))
            for index, size in enumerate(sizes)]


def test_batches_keep_order_and_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unseal, "_FILE_COST", 10)
    monkeypatch.setattr(unseal, "_BATCH_WORK", 100)
    files = _files([50, 50, 5, 300, 0, 0, 0, 90])

    batches = unseal._batches(files)

    assert [item for batch in batches for item in batch] == files
    # A batch closes once it contains at least 100 of work: 60 + 60, 15 + 310, then 10 + 10 +
    # 10 + 100.
    assert [len(batch) for batch in batches] == [2, 2, 4]


def test_batch_count_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cap keeps the queue of batch numbers within what a pipe buffers.
    monkeypatch.setattr(unseal, "_FILE_COST", 1)
    monkeypatch.setattr(unseal, "_BATCH_WORK", 1)
    monkeypatch.setattr(unseal, "_MAX_BATCHES", 8)

    batches = unseal._batches(_files([0] * 100))

    assert len(batches) <= 8
    assert sum(len(batch) for batch in batches) == 100
