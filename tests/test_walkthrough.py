"""The Flask walk-through end to end: examples/flask-restapi/run-walkthrough.sh under podman.

The script builds the native image, starts a CAS over TLS on 127.0.0.1, converts the image with
sconify_image, starts the confidential container with podman-compose, then POSTs and GETs
patient_3 with curl --cacert (the CA certificate the CAS exports for the session). Run with
--pause, it waits before cleaning up, so the test checks the running service's certificate
itself, then lets the script clean up and checks that nothing is left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from cryptography import x509

from tests.sconify_support import free_port, port_is_free, wait_for_free_port

pytestmark = [pytest.mark.podman, pytest.mark.slow]

TOP = Path(__file__).resolve().parent.parent
SCRIPT = TOP / "examples" / "flask-restapi" / "run-walkthrough.sh"
PATIENT = {
    "fname": "Jane",
    "lname": "Doe",
    "address": "'123 Main Street'",
    "city": "Richmond",
    "state": "Washington",
    "ssn": "123-223-2345",
    "email": "nr@aaa.com",
    "dob": "01/01/2010",
    "contactphone": "123-234-3456",
    "drugallergies": "'Sulpha, Penicillin, Tree Nut'",
    "preexistingconditions": "'diabetes, hypertension, asthma'",
    "dateadmitted": "01/05/2010",
    "insurancedetails": "'Primera Blue Cross'",
}
PAUSE_LINE = re.compile(r"--cacert (\S+)\); press Enter")


def _server_certificate(cafile: Path) -> x509.Certificate:
    """Connect to the service as a client that trusts only ``cafile`` and checks the name api."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", 4996), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="api") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _image_exists(podman: str, name: str) -> bool:
    done = subprocess.run(
        [podman, "image", "exists", name], capture_output=True, timeout=60, check=False
    )
    return done.returncode == 0


def test_walkthrough_end_to_end(podman: str, python_base_image: str, tmp_path: Path) -> None:
    if shutil.which("openssl") is None or shutil.which("curl") is None:
        pytest.skip("the walk-through needs openssl and curl")
    if not wait_for_free_port(4996):
        pytest.skip("127.0.0.1:4996 stays in use by another process; the example needs it")
    suffix = uuid.uuid4().hex[:8]
    native = f"localhost/enclavify-test/walkthrough-native-{suffix}"
    confidential = f"localhost/enclavify-test/walkthrough-{suffix}"
    cas_port = free_port()
    env = dict(
        os.environ,
        NATIVE_IMAGE=native,
        IMAGE=confidential,
        CAS_PORT=str(cas_port),
        BASE=python_base_image,
        ENGINE=podman,
        TMPDIR=str(tmp_path),
    )
    stdout_path = tmp_path / "stdout"
    stderr_lines: list[str] = []
    with stdout_path.open("w") as stdout:
        process = subprocess.Popen(
            [str(SCRIPT), "--pause"],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert process.stdin is not None and process.stderr is not None
        cafile = None
        timer = threading.Timer(900, process.kill)
        timer.start()
        try:
            for line in process.stderr:
                stderr_lines.append(line)
                match = PAUSE_LINE.search(line)
                if match:
                    cafile = Path(match.group(1))
                    break
            log = "".join(stderr_lines)
            assert cafile is not None, f"the walk-through failed:\n{log[-6000:]}"
            work = cafile.parent

            # While the script waits: the service's certificate chains to the session's CA,
            # which the CAS exported, and names api; python's ssl checks both.
            certificate = _server_certificate(cafile)
            ca = x509.load_pem_x509_certificate(cafile.read_bytes())
            values = json.loads((work / "values.json").read_text())
            assert values["api_ca_cert"].strip() == cafile.read_text().strip()
            assert certificate.issuer == ca.subject
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert "api" in names.value.get_values_for_type(x509.DNSName)
            openssl = subprocess.run(
                ["openssl", "s_client", "-connect", "127.0.0.1:4996", "-servername", "api",
                 "-verify_hostname", "api", "-CAfile", str(cafile), "-verify_return_error"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                check=False,
            )
            assert "Verify return code: 0 (ok)" in openssl.stdout, openssl.stdout[-2000:]
            # The placeholder certificate baked into the native image does not verify.
            with pytest.raises(ssl.SSLCertVerificationError):
                _server_certificate(_placeholder_ca(podman, native, tmp_path))

            process.stdin.write("\n")
            process.stdin.flush()
            stderr_lines.append(process.stderr.read())
            status = process.wait(timeout=300)
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
    log = "".join(stderr_lines)
    assert status == 0, log[-6000:]

    # The script printed the two responses: the POSTed record with id and score, and the
    # same record from the GET.
    records = [json.loads(line) for line in stdout_path.read_text().splitlines() if line.strip()]
    posted, fetched = records[-2], records[-1]
    assert {key: posted[key] for key in PATIENT} == PATIENT
    assert posted["id"] == "patient_3"
    assert isinstance(posted["score"], float)
    assert fetched == posted
    assert "INSECURE: the session accepts simulation evidence" in log
    assert "Verify return code: 0 (ok)" in log

    # Nothing is left: no work directory, no CAS, no container, neither image. The script
    # reports the clean-up on stderr.
    assert "run-walkthrough: removed the service, the CAS, both example images" in log
    assert not work.exists()
    assert port_is_free(cas_port)
    assert port_is_free(4996)
    assert not _image_exists(podman, confidential)
    assert not _image_exists(podman, native)
    containers = subprocess.run(
        [podman, "ps", "-a", "--format", "{{.Image}}"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert confidential not in containers


def _placeholder_ca(podman: str, native: str, tmp_path: Path) -> Path:
    """The self-signed placeholder certificate from the native image."""
    target = tmp_path / "placeholder.crt"
    done = subprocess.run(
        [podman, "run", "--rm", "--network=none", native, "cat", "/tls/flask.crt"],
        capture_output=True, timeout=120, check=True,
    )
    target.write_bytes(done.stdout)
    return target
