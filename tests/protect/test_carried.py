"""Unsealing works from the carried module subset alone, on an interpreter without cryptography."""

from __future__ import annotations

import ast
import json
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


def test_unseal_from_carried_modules_without_cryptography(tmp_path: Path) -> None:
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if python is None:
        pytest.skip("no system python3 to run the carried modules with")
    lib = tmp_path / "lib"
    for relative in CARRIED:
        (lib / "enclavify" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE / relative, lib / "enclavify" / relative)
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
