"""The launcher's measurement, taken by a child process and the launcher while it gets ready."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from enclavify.attest import treehash
from enclavify.attest.treehash import BLOCK, DEFERRED, sha256_and_compare, tree_entries
from enclavify.errors import LaunchError
from enclavify.runtime import measuring
from enclavify.runtime.config import RuntimeConfig
from enclavify.runtime.measuring import PendingMeasurement, measure


def _image(
    root: Path, binary: str = "/usr/bin/python3", interpreter: bytes | None = None
) -> Path:
    """A root with a runtime tree and its settings; returns the runtime directory.

    ``interpreter`` is the content of the runtime's ``bin/python3``, if it has one.
    """
    runtime = root / "opt" / "enclavify"
    (runtime / "lib").mkdir(parents=True)
    (runtime / "lib" / "libexample.so").write_bytes(os.urandom(300_000))
    program = root / "usr" / "bin" / "python3"
    program.parent.mkdir(parents=True)
    program.write_bytes(os.urandom(600_000))
    if interpreter is not None:
        (runtime / "bin").mkdir()
        (runtime / "bin" / "python3").write_bytes(interpreter)
    RuntimeConfig(binary=binary, heap=1 << 30, stack=4 << 20, dlopen=2).write(
        runtime / "runtime.json"
    )
    return runtime


def _reaped(pending: PendingMeasurement) -> bool:
    try:
        os.waitpid(pending._child, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_pending_measurement_is_what_the_launcher_would_measure(tmp_path: Path) -> None:
    runtime = _image(tmp_path)
    expected = measure(RuntimeConfig.load(runtime / "runtime.json"), runtime, tmp_path)

    pending = PendingMeasurement(runtime, tmp_path)

    assert pending.result() == expected
    assert pending.result() == expected
    assert _reaped(pending)


@pytest.mark.parametrize("copy", ["same", "changed at the end", "shorter", "longer", "symlink"])
def test_interpreter_copy_measured_fully(tmp_path: Path, copy: str) -> None:
    # The launcher takes the digest of the runtime's interpreter from the binary only when
    # both are the same bytes. Any other copy is hashed, so the measurement is the full one.
    runtime = _image(tmp_path, interpreter=b"")
    content = (tmp_path / "usr" / "bin" / "python3").read_bytes()
    interpreter = runtime / "bin" / "python3"
    if copy == "symlink":
        interpreter.unlink()
        interpreter.symlink_to("/usr/bin/python3")
    else:
        interpreter.write_bytes({
            "same": content,
            "changed at the end": content[:-1] + bytes([content[-1] ^ 1]),
            "shorter": content[:-1],
            "longer": content + b"\0",
        }[copy])
    expected = measure(RuntimeConfig.load(runtime / "runtime.json"), runtime, tmp_path)

    assert PendingMeasurement(runtime, tmp_path).result() == expected


def test_identical_copy_not_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = _image(tmp_path, interpreter=b"")
    (runtime / "bin" / "python3").write_bytes((tmp_path / "usr/bin/python3").read_bytes())
    expected = measure(RuntimeConfig.load(runtime / "runtime.json"), runtime, tmp_path)
    pending = PendingMeasurement(runtime, tmp_path)

    def refuse(*arguments: object) -> object:
        raise AssertionError("the launcher hashed the runtime's interpreter itself")

    monkeypatch.setattr(treehash, "entry_of", refuse)  # in this process only: the child runs

    assert pending.result() == expected


@pytest.mark.parametrize(
    ("size", "change"),
    [(0, None), (BLOCK, None), (BLOCK + 7, None), (3 * BLOCK, 0), (3 * BLOCK, BLOCK),
     (3 * BLOCK, 3 * BLOCK - 1), (BLOCK + 7, BLOCK + 6)],
)
def test_sha256_and_compare(size: int, change: int | None) -> None:
    data = os.urandom(size)
    other = bytearray(data)
    if change is not None:
        other[change] ^= 1

    digest, identical = sha256_and_compare(io.BytesIO(data), io.BytesIO(bytes(other)))

    assert digest == hashlib.sha256(data).hexdigest()
    assert identical is (change is None)
    for different in (data[:-1], data + b"x") if data else (b"x",):
        assert sha256_and_compare(io.BytesIO(data), io.BytesIO(different)) == (digest, False)


def test_deferred_entry_is_listed_without_its_digest(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").write_bytes(b"interpreter")
    (tmp_path / "bin" / "link").symlink_to("python3")
    full = tree_entries(tmp_path)

    assert tree_entries(tmp_path, deferred="bin/python3") == [
        [kind, path, mode, DEFERRED if path == "bin/python3" else digest]
        for kind, path, mode, digest in full
    ]
    # Only a regular file is deferred; anything else is listed as it is.
    assert tree_entries(tmp_path, deferred="bin/link") == full


def test_change_on_disk_changes_the_measurement(tmp_path: Path) -> None:
    runtime = _image(tmp_path)
    before = PendingMeasurement(runtime, tmp_path).result()
    (runtime / "lib" / "libexample.so").write_bytes(b"changed")

    assert PendingMeasurement(runtime, tmp_path).result() != before


def test_child_failure_is_raised_with_its_reason(tmp_path: Path) -> None:
    runtime = _image(tmp_path, binary="/usr/bin/missing")

    pending = PendingMeasurement(runtime, tmp_path)

    with pytest.raises(LaunchError, match=r"cannot measure the binary.*missing"):
        pending.result()
    assert _reaped(pending)


def test_runtime_hash_failure_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(runtime_dir: object, deferred: object = None) -> list[object]:
        raise LaunchError("cannot measure the runtime: test failure")

    runtime = _image(tmp_path)
    monkeypatch.setattr(measuring, "_runtime_entries", unreadable)  # the child inherits it

    pending = PendingMeasurement(runtime, tmp_path)

    with pytest.raises(LaunchError, match="cannot measure the runtime: test failure"):
        pending.result()
    assert _reaped(pending)


def test_missing_settings_are_reported(tmp_path: Path) -> None:
    pending = PendingMeasurement(tmp_path / "nowhere", tmp_path)

    with pytest.raises(LaunchError, match=r"runtime settings .* not found"):
        pending.result()


def test_close_reaps_an_unused_child(tmp_path: Path) -> None:
    pending = PendingMeasurement(_image(tmp_path), tmp_path)

    pending.close()

    assert _reaped(pending)
