"""Reading a layer tar while another thread still writes it, and the GIL switch interval."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from enclavify.image.blobs import GrowingFile
from enclavify.image.source import _SWITCH_INTERVAL, _short_switch_interval


def _writer(path: Path, growing: GrowingFile, pieces: list[bytes], *, fail: bool = False) -> None:
    with open(path, "ab") as out:
        for piece in pieces:
            time.sleep(0.01)
            out.write(piece)
            out.flush()
            growing.grew(out.tell())
    growing.complete(failed=fail)


def test_reads_wait_for_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "layer.tar"
    path.touch()
    growing = GrowingFile(path)
    pieces = [bytes([n]) * 700 for n in range(5)]
    writer = threading.Thread(target=_writer, args=(path, growing, pieces))
    writer.start()
    try:
        # Each read requests more than has been written when it starts.
        assert growing.read(1000) == bytes([0]) * 700 + bytes([1]) * 300
        growing.seek(2800)
        assert growing.read(10_000) == bytes([4]) * 700  # the rest, once the file is complete
        assert growing.read(10) == b""
        assert growing.tell() == 3500
    finally:
        writer.join()
        growing.close()


def test_read_after_failed_write_raises(tmp_path: Path) -> None:
    path = tmp_path / "layer.tar"
    path.touch()
    growing = GrowingFile(path)
    writer = threading.Thread(
        target=_writer, args=(path, growing, [b"x" * 10]), kwargs={"fail": True}
    )
    writer.start()
    try:
        with pytest.raises(OSError, match="writing the file failed"):
            growing.read(100)
    finally:
        writer.join()
        growing.close()


def test_switch_interval_restored_by_last_user() -> None:
    before = sys.getswitchinterval()
    with _short_switch_interval:
        assert sys.getswitchinterval() == pytest.approx(_SWITCH_INTERVAL)
        with _short_switch_interval:  # a second thread unpacking at the same time
            pass
        assert sys.getswitchinterval() == pytest.approx(_SWITCH_INTERVAL)
    assert sys.getswitchinterval() == before
