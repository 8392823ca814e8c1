"""Unsealing works from the carried module subset alone, on an interpreter without cryptography."""

from __future__ import annotations

import ast
import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import enclavify
from enclavify.protect import seal_tree
from tests.protect.trees import Node, assert_same_tree, build

PACKAGE = Path(enclavify.__file__).resolve().parent

# What the launcher needs for unsealing; seal.py is deliberately absent.
CARRIED = [
    "__init__.py",
    "errors.py",
    "jsontext.py",
    "logs.py",
    "values.py",
    "crypto.py",
    "runtime/__init__.py",
    "runtime/libcrypto.py",
    "protect/__init__.py",
    "protect/format.py",
    "protect/unseal.py",
]

UNSEAL_SCRIPT = """
import json, sys
sys.modules["cryptography"] = None  # as in an image without pyca/cryptography
sys.path.insert(0, sys.argv[1])
from enclavify import crypto
from enclavify.protect import unseal_tree
request = json.load(sys.stdin)
manifest = unseal_tree(sys.argv[2], bytes.fromhex(request["key"]),
                       bytes.fromhex(request["tag"]), sys.argv[3])
print(json.dumps({
    "backend": crypto.backend_name(),
    "entries": len(manifest.entries),
    "seal_loaded": "enclavify.protect.seal" in sys.modules,
    "cryptography_loaded": any(name.startswith("cryptography.") for name in sys.modules),
}))
"""


@pytest.mark.parametrize("relative", CARRIED)
def test_carried_module_parses_as_python_3_8(relative: str) -> None:
    source = (PACKAGE / relative).read_text()

    ast.parse(source, filename=relative, feature_version=(3, 8))


def copy_carried(lib: Path) -> Path:
    """Copy the carried modules alone into ``lib``, as the runtime builder does."""
    for relative in CARRIED:
        (lib / "enclavify" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE / relative, lib / "enclavify" / relative)
    return lib


def find_interpreter(name: str) -> str | None:
    """Return a path of the system's ``python3`` or of a Python 3.8, the oldest supported."""
    if name == "python3":
        return shutil.which("python3", path="/usr/bin:/usr/local/bin")
    # A pyenv shim may stand on PATH without a 3.8 selected, so installed versions come first.
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8.*/bin/python3.8")))
    if pyenv:
        return pyenv[-1]
    return shutil.which("python3.8", path="/usr/bin:/usr/local/bin")


@pytest.mark.parametrize("interpreter", ["python3", "python3.8"])
def test_unseal_from_carried_modules_without_cryptography(tmp_path: Path, interpreter: str) -> None:
    python = find_interpreter(interpreter)
    if python is None:
        pytest.skip(f"no {interpreter} interpreter to run the carried modules with")
    lib = copy_carried(tmp_path / "lib")
    source = tmp_path / "source"
    source.mkdir()
    build(
        source / "app",
        Node(
            "dir",
            children={
                "main.py": Node("file", content=b"print('hi')\n" * 20000, mode=0o755),
                "empty": Node("file"),
                "lib": Node(
                    "dir", mode=0o750, children={"x": Node("symlink", target="../main.py")}
                ),
                "hard": Node("hardlink", target="main.py"),
            },
        ),
    )
    volume = seal_tree(source, ["/app"], tmp_path / "sealed")
    target = tmp_path / "target"
    target.mkdir()

    # The key and tag travel on stdin: secrets never go into argv.
    result = subprocess.run(
        [
            python,
            "-I",
            "-S",
            "-B",
            "-c",
            UNSEAL_SCRIPT,
            str(lib),
            str(tmp_path / "sealed"),
            str(target),
        ],
        input=json.dumps({"key": volume.key.hex(), "tag": volume.tag.hex()}),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {
        "backend": "libcrypto",
        "entries": 6,
        "seal_loaded": False,
        "cryptography_loaded": False,
    }
    assert_same_tree(source / "app", target / "app")


CRYPTO_SCRIPT = """
import sys
sys.modules["cryptography"] = None
sys.path.insert(0, sys.argv[1])
from enclavify import crypto
private, public = crypto.x25519_generate()
peer_private, peer_public = crypto.x25519_generate()
shared = crypto.x25519_exchange(private, peer_public)
assert shared == crypto.x25519_exchange(peer_private, public)
key = crypto.hkdf_sha256(shared, salt=b"nonce", info=b"enclavify-config-v1")
sealed = crypto.aes_gcm_encrypt(key, bytes(12), b"configuration", b"")
assert crypto.aes_gcm_decrypt(key, bytes(12), sealed, b"") == b"configuration"
try:
    crypto.aes_gcm_decrypt(key, bytes(12), sealed[:-1] + bytes([sealed[-1] ^ 1]), b"")
except crypto.AuthenticationError:
    pass
else:
    raise SystemExit("tampered ciphertext was accepted")
print(crypto.backend_name(), crypto.aes_gcm_encrypt(bytes(32), bytes(12), b"", b"").hex())
"""


@pytest.mark.parametrize("interpreter", ["python3", "python3.8"])
def test_crypto_facade_runs_on_carried_interpreter(tmp_path: Path, interpreter: str) -> None:
    python = find_interpreter(interpreter)
    if python is None:
        pytest.skip(f"no {interpreter} interpreter to run the carried modules with")
    lib = copy_carried(tmp_path / "lib")

    result = subprocess.run(
        [python, "-I", "-S", "-B", "-c", CRYPTO_SCRIPT, str(lib)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    # AES-256-GCM test case 13 of McGrew and Viega: zero key and nonce, empty plaintext.
    assert result.stdout.split() == ["libcrypto", "530f8afbc74536b9a963b4f1c4cb738b"]
