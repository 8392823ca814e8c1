"""Fixtures for the runtime tests: built runtimes and root file systems to run them in."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavify.runtime.builder import DirectoryFiles, RuntimeInfo, build_runtime


def run_in_root(root: Path, entrypoint: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``entrypoint + args`` chrooted into ``root`` with an empty environment."""
    chroot = shutil.which("chroot")
    if os.geteuid() != 0 or chroot is None:
        pytest.skip("running a runtime in an empty root needs chroot and root")
    return subprocess.run(
        [chroot, str(root), *entrypoint, *args],
        env={},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="session")
def host_runtime(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RuntimeInfo]:
    """A runtime built from this machine's own root and /usr/bin/python3."""
    if not Path("/usr/bin/python3").exists():
        pytest.skip("this machine has no /usr/bin/python3 to build a runtime from")
    output = tmp_path_factory.mktemp("host-runtime") / "opt" / "enclavify"
    info = build_runtime(
        DirectoryFiles(Path("/")), output, python="/usr/bin/python3", source="host"
    )
    return output, info


@pytest.fixture(scope="session")
def base_rootfs(
    podman: str, python_base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The root file system of the local Python base image, unpacked."""
    root = tmp_path_factory.mktemp("base-rootfs")
    create = subprocess.run(
        [podman, "create", python_base_image, "/bin/true"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    container = create.stdout.strip()
    try:
        archive = root.parent / "base-rootfs.tar"
        subprocess.run([podman, "export", "-o", str(archive), container], check=True, timeout=300)
        subprocess.run(["tar", "-xf", str(archive), "-C", str(root)], check=True, timeout=300)
        archive.unlink()
    finally:
        subprocess.run([podman, "rm", "-f", container], capture_output=True, check=False)
    yield root
    shutil.rmtree(root, ignore_errors=True)
