"""Hostile and malformed input: fuzzing from the OpenAPI description, YAML bombs, huge bodies."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enclavify.cas.client import Identity, parse_address
from enclavify.cas.openapi import SPEC
from enclavify.cas.server import MAX_BODY, ROUTES

from .conftest import CasProcess, namespace_yaml, unique


def _post(server: CasProcess, identity: Identity | None, path: str, body: bytes,
          content_type: str = "application/yaml") -> tuple[int, dict[str, object], float]:
    context = ssl.create_default_context(cadata=server.ca_pem.decode())
    if identity is not None:
        context.load_cert_chain(identity.path)
    host, port = parse_address(server.address)
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    started = time.monotonic()
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    return response.status, json.loads(data), time.monotonic() - started


def test_alias_bomb_refused_quickly(
    shared_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):
        previous = chr(ord("a") + level - 1)
        current = chr(ord("a") + level)
        lines.append(f"{current}: &{current} [{', '.join([f'*{previous}'] * 10)}]")
    bomb = ("name: bomb\n" + "\n".join(lines) + "\n").encode()
    status, answer, elapsed = _post(shared_cas, identities["alice"], "/v1/sessions", bomb)
    assert status == 400
    assert "alias" in str(answer["error"]).lower()
    assert elapsed < 2.0


def test_deep_nesting_refused_quickly(
    shared_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    deep = ("name: deep\nx: " + "[" * 5000 + "]" * 5000 + "\n").encode()
    status, answer, elapsed = _post(shared_cas, identities["alice"], "/v1/sessions", deep)
    assert status == 400
    assert "nest" in str(answer["error"]).lower() or "depth" in str(answer["error"]).lower()
    assert elapsed < 2.0


def test_oversize_body_is_413(shared_cas: CasProcess, identities: dict[str, Identity]) -> None:
    big = b"name: big\n# " + b"x" * (MAX_BODY + 10) + b"\n"
    status, answer, _elapsed = _post(shared_cas, identities["alice"], "/v1/sessions", big)
    assert status == 413
    assert "larger than" in str(answer["error"])
    status, _, _ = _post(shared_cas, None, "/v1/attest", b"{" + b" " * (MAX_BODY + 10) + b"}",
                         "application/json")
    assert status == 413


def test_invalid_session_names_yaml_path(
    shared_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    text = namespace_yaml(unique("bad")) + "services:\n  - name: s\n    command: x\n    bogus: 1\n"
    status, answer, _ = _post(shared_cas, identities["alice"], "/v1/sessions", text.encode())
    assert status == 400
    assert "services[0]" in str(answer["error"])


def test_non_utf8_session_is_400(
    shared_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    text = namespace_yaml(unique("utf16")).encode("utf-16")
    status, answer, _ = _post(shared_cas, identities["alice"], "/v1/sessions", text)
    assert status == 400
    assert "UTF-8" in str(answer["error"])


def test_openapi_matches_routes() -> None:
    served = {(method.lower(), _canonical(path)) for method, path, _ in ROUTES}
    described = {
        (method, path) for path, item in SPEC["paths"].items() for method in item
    }
    assert served == described


def _canonical(path: str) -> str:
    return path.replace("{name:.+}", "{name}")


def test_openapi_is_served(shared_cas: CasProcess) -> None:
    answer = shared_cas.client(None)._request("GET", "/v1/openapi.json")
    assert answer == json.loads(json.dumps(SPEC))


@pytest.mark.slow
def test_fuzzing_finds_no_server_error(
    shared_cas: CasProcess, identities: dict[str, Identity], tmp_path: Path
) -> None:
    executable = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(executable).exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(shared_cas.ca_pem)
    identity_pem = Path(identities["alice"].path).read_text()
    key = tmp_path / "key.pem"
    cert = tmp_path / "cert.pem"
    key.write_text(identity_pem[: identity_pem.index("-----BEGIN CERTIFICATE-----")])
    cert.write_text(identity_pem[identity_pem.index("-----BEGIN CERTIFICATE-----"):])
    _host, port = parse_address(shared_cas.address)
    url = f"https://localhost:{port}/v1/openapi.json"
    completed = subprocess.run(
        [executable, "run", url, "--checks", "not_a_server_error", "--max-examples", "40",
         "--tls-verify", str(ca), "--request-cert", str(cert), "--request-cert-key", str(key),
         "--seed", "1", "--workers", "2", "--request-timeout", "20", "--no-color"],
        capture_output=True, text=True, timeout=170, check=False, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    # aiohttp logs its own 400s for unparseable requests with a traceback; only failures that
    # reached the CAS's handlers count here.
    assert "unexpected failure" not in shared_cas.log(), shared_cas.log()[-6000:]
    assert "CAS failure" not in shared_cas.log(), shared_cas.log()[-6000:]
