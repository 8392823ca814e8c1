"""The Flask example: the local base image, the native image and its HTTPS API under podman."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.podman

PATIENT_FORM = (
    "fname=Jane&lname=Doe&address='123 Main Street'&city=Richmond&state=Washington"
    "&ssn=123-223-2345&email=nr@aaa.com&dob=01/01/2010&contactphone=123-234-3456"
    "&drugallergies='Sulpha, Penicillin, Tree Nut'"
    "&preexistingconditions='diabetes, hypertension, asthma'&dateadmitted=01/05/2010"
    "&insurancedetails='Primera Blue Cross'"
)


@dataclass
class Api:
    port: int
    cacert: Path

    def request(self, method: str, path: str, form: str | None = None) -> tuple[int, str]:
        """Send one request to https://api:PORT with curl, trusting only the placeholder cert."""
        url = f"https://api:{self.port}{path}"
        command = ["curl", "-sS", "--max-time", "10", "-X", method, url,
                   "--resolve", f"api:{self.port}:127.0.0.1", "--cacert", str(self.cacert),
                   "-w", "\n%{http_code}"]
        if form is not None:
            command += ["-d", form]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"curl {method} {path} failed: {done.stderr}"
        body, _, status = done.stdout.rpartition("\n")
        return int(status), body


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def running_api(podman: str, native_flask_image: str, tmp_path: Path) -> Iterator[Api]:
    port = _free_port()
    name = f"enclavify-test-flask-{os.getpid()}"
    subprocess.run(
        [podman, "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:4996",
         native_flask_image],
        check=True, capture_output=True, timeout=120,
    )
    try:
        cacert = tmp_path / "flask.crt"
        subprocess.run([podman, "cp", f"{name}:/tls/flask.crt", str(cacert)],
                       check=True, capture_output=True, timeout=60)
        api = Api(port, cacert)
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "--resolve", f"api:{port}:127.0.0.1",
                 "--cacert", str(cacert), f"https://api:{port}/patient/none"],
                check=False,
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                logs = subprocess.run([podman, "logs", name], capture_output=True, text=True,
                                      check=False)
                pytest.fail(f"the API did not answer within 30 s:\n{logs.stderr}")
            time.sleep(0.3)
        yield api
    finally:
        subprocess.run([podman, "rm", "-f", "-t", "2", name], capture_output=True, check=False)


def test_base_image_imports_flask_offline(podman: str, python_base_image: str) -> None:
    done = subprocess.run(
        [podman, "run", "--rm", "--network=none", python_base_image,
         "python3", "-c", "import flask, flask_restful, ssl; print(ssl.OPENSSL_VERSION)"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "OpenSSL" in done.stdout


def test_base_image_has_no_apt_lists_or_docs(podman: str, python_base_image: str) -> None:
    done = subprocess.run(
        [podman, "run", "--rm", "--network=none", python_base_image, "sh", "-c",
         "ls /var/lib/apt/lists /var/cache/apt /usr/share/doc | grep -v ':$' | grep -v '^$'"
         " | grep -v '^partial$' || true"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_native_image_runs_the_app(podman: str, native_flask_image: str) -> None:
    done = subprocess.run([podman, "image", "inspect", native_flask_image],
                          capture_output=True, text=True, check=True)
    config = json.loads(done.stdout)[0]["Config"]
    assert config["Cmd"] == ["python3", "-B", "/app/rest_api.py"]
    assert "4996/tcp" in config["ExposedPorts"]


def test_placeholder_certificate_names_api(podman: str, native_flask_image: str) -> None:
    done = subprocess.run(
        [podman, "run", "--rm", "--network=none", native_flask_image,
         "python3", "-c",
         "import ssl, json; print(json.dumps(ssl._ssl._test_decode_cert('/tls/flask.crt')))"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    certificate = json.loads(done.stdout)
    assert ["commonName", "api"] in [entry[0] for entry in certificate["subject"]]
    assert ["DNS", "api"] in certificate["subjectAltName"]


def test_patient_post_then_get(running_api: Api) -> None:
    status, body = running_api.request("POST", "/patient/patient_3", PATIENT_FORM)
    assert status == 201, body
    created = json.loads(body)
    assert created["id"] == "patient_3"
    assert created["fname"] == "Jane"
    assert created["drugallergies"] == "'Sulpha, Penicillin, Tree Nut'"
    assert isinstance(created["score"], float)

    status, body = running_api.request("GET", "/patient/patient_3")
    assert status == 200, body
    assert json.loads(body) == created

    status, body = running_api.request("GET", "/score/patient_3")
    assert status == 200, body
    assert json.loads(body) == {"id": "patient_3", "score": created["score"]}


def test_patient_second_post_is_403(running_api: Api) -> None:
    status, body = running_api.request("POST", "/patient/patient_7", "fname=A")
    assert status == 201, body
    status, body = running_api.request("POST", "/patient/patient_7", "fname=B")
    assert status == 403, body
    status, body = running_api.request("GET", "/patient/patient_7")
    assert json.loads(body)["fname"] == "A"


def test_unknown_patient_is_404(running_api: Api) -> None:
    assert running_api.request("GET", "/patient/nobody")[0] == 404
    assert running_api.request("GET", "/score/nobody")[0] == 404


def test_hooks_define_tls_secrets(flask_example_dir: Path) -> None:
    done = subprocess.run(
        ["bash", "-c", 'source ./hooks.sh && printf "%s\\n---\\n%s" "$SECRETS" "$INJECTED_FILES"'],
        cwd=flask_example_dir, capture_output=True, text=True, check=True,
    )
    secrets_text, injected_text = done.stdout.split("\n---\n")
    secrets = {item["name"]: item for item in yaml.safe_load(secrets_text)["secrets"]}
    assert secrets["flask"]["kind"] == "x509"
    assert secrets["flask"]["issuer"] == "api_ca_cert"
    assert secrets["flask"]["dns"] == ["api"]
    assert secrets["api_ca_cert"]["export_public"] is True
    injected = yaml.safe_load(injected_text)["injection_files"]
    assert injected == [
        {"path": "/tls/flask.crt", "content": "$$SCONE::flask.crt$$"},
        {"path": "/tls/flask.key", "content": "$$SCONE::flask.key$$"},
    ]
