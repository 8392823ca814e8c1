"""A real ``enclavify cas serve`` subprocess for tests, on an ephemeral port of 127.0.0.1.

The CAS makes its own TLS certificates in its data directory; :attr:`CasProcess.ca_pem` is
what a client pins. A thread reads its stderr continuously, so the server never blocks on a
full pipe, and keeps the lines for :meth:`CasProcess.log` when a test fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from enclavify.cas.client import CasClient, Identity

START_SECONDS = 60


@dataclass
class CasProcess:
    """One ``enclavify cas serve`` subprocess and the lines it wrote to stderr.

    Used as a context manager, it stops the CAS when the block ends.
    """

    data: Path
    process: subprocess.Popen[str]
    address: str
    db: str | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def certificate(self) -> Path:
        """The CA certificate file clients pin."""
        return self.data / "ca.pem"

    @property
    def ca_pem(self) -> bytes:
        return self.certificate.read_bytes()

    def client(self, identity: Identity | None = None, **options: object) -> CasClient:
        return CasClient(self.address, ca_pem=self.ca_pem, identity=identity, **options)  # type: ignore[arg-type]

    def log(self) -> str:
        return "".join(self.lines)

    def __enter__(self) -> CasProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` (SIGKILL for crash tests) and wait. Kill it if it outlasts 20 s."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_cas(
    data: Path,
    *,
    db: str | None = None,
    listen: str = "127.0.0.1:0",
    extra_env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    verbose: bool = True,
) -> CasProcess:
    """Start a CAS with its files in ``data`` and wait until it listens.

    ``db`` is a PostgreSQL URL; without it the CAS keeps SQLite in ``data``. ``verbose``
    runs it with ``-v`` (DEBUG logging) for tests that read :meth:`CasProcess.log`. A
    benchmark turns it off so that logging does not weigh on what it measures.

    Raises:
        RuntimeError: the CAS exited or did not listen within a minute; the message contains
            what it wrote.
    """
    command = [sys.executable, "-m", "enclavify", *(["-v"] if verbose else []), "cas", "serve",
               "--data", str(data), "--listen", listen]
    if db:
        command += ["--db", db]
    command += list(extra_args)
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env={**os.environ, **(extra_env or {})},
    )
    assert process.stderr is not None
    lines: list[str] = []
    address = None
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening on https://(\S+)", line)
        if match:
            address = match.group(1)
            break
    if address is None:
        process.kill()
        rest = process.stderr.read()
        process.wait()
        raise RuntimeError("the CAS did not start:\n" + "".join(lines) + rest)

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return CasProcess(data, process, address, db, lines)
