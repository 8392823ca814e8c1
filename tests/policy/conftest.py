from __future__ import annotations

import pytest

MRENCLAVE = "ab" * 32
FSPF_KEY = "11" * 32
FSPF_TAG = "22" * 16

VALID_SESSION = f"""
name: my_namespace-1/flask
version: "0.3"

services:
  - name: service
    image_name: flask_image
    mrenclaves: ["{MRENCLAVE}"]
    command: python3 -B /app/rest_api.py
    environment:
      PORT: 4996
      DB_PASSWORD: "$$SCONE::db_password$$"
    pwd: /app
    fspf_path: /.enclavify/fspf
    fspf_key: "{FSPF_KEY}"
    fspf_tag: "{FSPF_TAG}"

images:
  - name: flask_image
    injection_files:
      - path: /tls/flask.crt
        content: $$SCONE::flask.crt$$
      - path: /tls/flask.key
        content: "$$SCONE::flask.key$$"

secrets:
  - name: db_password
    kind: ascii
    size: 24
  - name: api_ca_key
    kind: private-key
  - name: api_ca_cert
    kind: x509-ca
    export_public: true
    private_key: api_ca_key
  - name: flask_key
    kind: private-key
  - name: flask
    kind: x509
    private_key: flask_key
    issuer: api_ca_cert
    dns:
      - api

security:
  attestation:
    mode: simulation
"""


@pytest.fixture
def session_text() -> str:
    return VALID_SESSION
