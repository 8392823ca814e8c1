"""`enclavify image convert` starts without the CAS server stack."""

from __future__ import annotations

import json
import subprocess
import sys

from enclavify.cli import GROUPS, build_parser

_PROBE = """
import contextlib, json, sys
from enclavify.cli import main
with contextlib.redirect_stdout(None), contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after(*argv: str) -> set[str]:
    process = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120,
        check=True,
    )
    return set(json.loads(process.stdout.splitlines()[-1]))


def test_image_convert_imports_no_server_modules() -> None:
    modules = _modules_after("-v", "image", "convert", "--help")
    assert "enclavify.cli.image" in modules
    heavy = {"asyncio", "aiohttp", "psycopg", "enclavify.cas.server", "enclavify.cli.cas"}
    assert not heavy & modules
    # Only a conversion with --cas-cert, or one to or from a registry, needs these.
    assert "cryptography.x509" not in modules
    assert "http.client" not in modules
    assert "enclavify.cas.client" not in modules
    assert "ssl" not in modules


def test_cas_command_still_loads_its_group() -> None:
    modules = _modules_after("cas", "--help")
    assert "enclavify.cli.cas" in modules
    assert "enclavify.cli.image" not in modules


def test_whole_parser_lists_every_group() -> None:
    help_text = build_parser().format_help()
    for name in GROUPS:
        assert name in help_text
