"""The launcher's measurement, taken by a child process and the launcher while it gets ready."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enclavify.errors import LaunchError
from enclavify.runtime import measuring
from enclavify.runtime.config import RuntimeConfig
from enclavify.runtime.measuring import PendingMeasurement, measure


def _image(root: Path, binary: str = "/usr/bin/python3") -> Path:
    """A root with a runtime tree and its settings; returns the runtime directory."""
    runtime = root / "opt" / "enclavify"
    (runtime / "lib").mkdir(parents=True)
    (runtime / "lib" / "libexample.so").write_bytes(os.urandom(300_000))
    program = root / "usr" / "bin" / "python3"
    program.parent.mkdir(parents=True)
    program.write_bytes(os.urandom(100_000))
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


def test_runtime_failure_in_the_child_is_raised_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(runtime_dir: object) -> list[object]:
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
