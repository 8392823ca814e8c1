"""Building the carried runtime and running it where nothing else exists."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from enclavify.attest.measurement import runtime_digest
from enclavify.errors import ImageError
from enclavify.runtime.builder import DirectoryFiles, RuntimeInfo, build_runtime

from .conftest import run_in_root

# Imports everything the launcher needs on its CAS path, then proves the crypto backend works.
PROBE = """
import sys, ssl, ctypes, json, hashlib, socket
from enclavify.runtime import launcher, libcrypto
launcher.pin_libcrypto("/opt/enclavify")
assert libcrypto.load().name.startswith("/opt/enclavify/lib/libcrypto.so"), libcrypto.load().name
import enclavify.runtime.launcher, enclavify.cas.client, enclavify.attest.producers
import enclavify.protect.unseal
from enclavify import crypto
private, public = crypto.x25519_generate()
assert len(crypto.x25519_exchange(private, public)) == 32
sealed = crypto.aes_gcm_encrypt(b"k" * 32, b"n" * 12, b"plain", b"aad")
assert crypto.aes_gcm_decrypt(b"k" * 32, b"n" * 12, sealed, b"aad") == b"plain"
assert "x".encode("idna") == b"x"
print(sys.prefix)
print(sys.version_info[:2])
print(sorted(p for p in sys.path))
"""


def _install(runtime: Path, root: Path) -> None:
    shutil.copytree(runtime, root / "opt" / "enclavify", symlinks=True)


def test_host_runtime_layout(host_runtime: tuple[Path, RuntimeInfo]) -> None:
    runtime, info = host_runtime
    version = ".".join(info.python_version.split(".")[:2])
    stdlib = runtime / "lib" / f"python{version}"
    assert (runtime / "bin" / "python3").stat().st_mode & 0o111
    assert (runtime / "lib" / Path(info.loader).name).is_file()
    assert (stdlib / "os.py").is_file()
    assert (stdlib / "encodings" / "utf_8.py").is_file()
    assert (stdlib / "enclavify" / "runtime" / "launcher.py").is_file()
    assert (stdlib / "enclavify" / "runtime" / "__main__.py").is_file()
    assert not (stdlib / "enclavify" / "runtime" / "builder.py").exists()
    assert not (stdlib / "enclavify" / "image").exists()
    assert list((stdlib / "lib-dynload").glob("_ssl*.so"))
    assert (runtime / "lib" / "libssl.so.3").is_file() or list(runtime.glob("lib/libssl.so*"))
    assert info.libc == "glibc"
    assert info.arch in ("x86_64", "aarch64")
    assert info.interpreter.startswith("/usr/bin/python3")
    assert len(info.interpreter_sha256) == 64
    assert info.source == "host"
    assert info.entrypoint[:4] == [
        info.loader,
        "--library-path",
        "/opt/enclavify/lib",
        "/opt/enclavify/bin/python3",
    ]
    assert info.entrypoint[4:] == [
        "-I", "-S", "-B", f"{info.stdlib}/enclavify/runtime/__main__.py", "run"
    ]
    assert (runtime / "lib" / Path(info.stdlib).name / "enclavify/runtime/__main__.py").is_file()
    files = [p for p in runtime.rglob("*") if p.is_file() and not p.is_symlink()]
    assert info.files == len(files)
    assert info.size == sum(p.stat().st_size for p in files)
    # A bound that fails if whole library directories were copied.
    assert info.size < 40 * 1024 * 1024


def test_runtime_starts_in_empty_root(
    host_runtime: tuple[Path, RuntimeInfo], tmp_path: Path
) -> None:
    runtime, info = host_runtime
    _install(runtime, tmp_path)
    interpreter = info.entrypoint[:-3]
    probe = run_in_root(tmp_path, interpreter, "-c", PROBE)
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[0] == "/opt/enclavify"
    assert all(path.startswith("/opt/enclavify/") for path in eval(lines[2]))


def test_plain_image_cannot_replace_stdlib(
    host_runtime: tuple[Path, RuntimeInfo], tmp_path: Path
) -> None:
    # Files outside /opt/enclavify are not measured, so none of them may become the
    # interpreter's standard library.
    runtime, info = host_runtime
    _install(runtime, tmp_path)
    version = "".join(info.python_version.split(".")[:2])
    dotted = ".".join(info.python_version.split(".")[:2])
    hostile = "raise SystemExit(99)\n"
    for parent in (tmp_path / "opt", tmp_path):
        (parent / "lib").mkdir(exist_ok=True)
        with zipfile.ZipFile(parent / "lib" / f"python{version}.zip", "w") as archive:
            archive.writestr("encodings/__init__.py", hostile)
            archive.writestr("os.py", hostile)
        (parent / "lib" / f"python{dotted}").mkdir(parents=True, exist_ok=True)
        (parent / "lib" / f"python{dotted}" / "os.py").write_text(hostile)
    probe = run_in_root(tmp_path, info.entrypoint[:-3], "-c", PROBE)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0] == "/opt/enclavify"


def test_launcher_without_settings_fails_cleanly(
    host_runtime: tuple[Path, RuntimeInfo], tmp_path: Path
) -> None:
    runtime, info = host_runtime
    _install(runtime, tmp_path)
    result = run_in_root(tmp_path, info.entrypoint)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "enclavify: error: runtime settings '/opt/enclavify/runtime.json' not found"
    )


def test_two_builds_have_same_digest(
    host_runtime: tuple[Path, RuntimeInfo], tmp_path: Path
) -> None:
    runtime, info = host_runtime
    again = build_runtime(
        DirectoryFiles(Path("/")), tmp_path / "rt", python="/usr/bin/python3", source="host"
    )
    assert runtime_digest(tmp_path / "rt") == runtime_digest(runtime)
    assert again == info


def test_image_without_python_needs_base(tmp_path: Path) -> None:
    (tmp_path / "root" / "usr" / "bin").mkdir(parents=True)
    with pytest.raises(ImageError, match="--base IMAGE"):
        build_runtime(DirectoryFiles(tmp_path / "root"), tmp_path / "out", source="image")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["root"]


def test_existing_output_is_rejected(host_runtime: tuple[Path, RuntimeInfo]) -> None:
    runtime, _info = host_runtime
    with pytest.raises(ImageError, match="already exists"):
        build_runtime(DirectoryFiles(Path("/")), runtime, source="host")


@pytest.mark.slow
def test_base_image_runtime_without_stdlib(base_rootfs: Path, tmp_path: Path) -> None:
    output = tmp_path / "rt"
    info = build_runtime(DirectoryFiles(base_rootfs), output, source="base")
    assert info.interpreter == "/usr/bin/python3.11"
    assert info.python_version.startswith("3.11.")
    assert info.libc == "glibc"

    # The image's own standard library and the shared libraries are encrypted in a
    # confidential image; the runtime must not need them.
    root = tmp_path / "root"
    # Device nodes are skipped: copying /dev/full or /dev/zero as files never ends.
    shutil.copytree(base_rootfs, root, symlinks=True, ignore=shutil.ignore_patterns("dev"))
    for directory in (
        "usr/lib/python3.11",
        "usr/lib/python3",
        "usr/local/lib",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib/aarch64-linux-gnu",
    ):
        shutil.rmtree(root / directory, ignore_errors=True)
    _install(output, root)
    probe = run_in_root(root, info.entrypoint[:-3], "-c", PROBE)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0] == "/opt/enclavify"

    second = build_runtime(DirectoryFiles(base_rootfs), tmp_path / "rt2", source="base")
    assert runtime_digest(output) == runtime_digest(tmp_path / "rt2")
    assert second.interpreter_sha256 == info.interpreter_sha256


def _other_pythons() -> list[Path]:
    """Interpreters of other versions on this machine (pyenv builds), oldest and newest."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in path.name[len("python") :].split("."))

    candidates = Path("/").glob("root/.pyenv/versions/3.*/bin/python3.*[0-9]")
    # The carried code supports Python 3.8 and newer.
    found = sorted((p for p in candidates if version(p) >= (3, 8)), key=version)
    return [found[0], found[-1]] if len(found) > 1 else found


@pytest.mark.parametrize("python", _other_pythons(), ids=lambda p: p.name)
def test_runtime_for_other_python_versions(python: Path, tmp_path: Path) -> None:
    output = tmp_path / "root" / "opt" / "enclavify"
    info = build_runtime(DirectoryFiles(Path("/")), output, python=str(python), source="host")
    assert info.python_version.startswith(python.name[len("python") :])
    probe = run_in_root(tmp_path / "root", info.entrypoint[:-3], "-c", PROBE)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0] == "/opt/enclavify"
