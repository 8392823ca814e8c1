from __future__ import annotations

import base64

import pytest

from enclavify.errors import PolicyError, SecretError
from enclavify.policy import parse_session, render_configuration
from enclavify.secrets import SecretValue, generate_secrets

from .conftest import FSPF_KEY, FSPF_TAG, VALID_SESSION

FORMATS_SESSION = """
name: formats
services:
  - name: app
    image_name: files
    command: ["/bin/app", "--token=$$SCONE::token:hex$$", "$$SCONE::word$$"]
    environment:
      WORD: "$$SCONE::word$$"
      WORD_HEX: "$$SCONE::word.hex$$"
      WORD_B64: "$$SCONE::word:base64$$"
      TOKEN: "$$SCONE::token$$"
      TOKEN_B64: "$$SCONE::token:base64$$"
      TWO: "$$SCONE::word$$-$$SCONE::word$$"
      PLAIN: "no variables here, just $ and $$"
images:
  - name: files
    injection_files:
      - {path: /etc/app/cert.pem, content: "$$SCONE::cert:crt$$"}
      - {path: /etc/app/chain.pem, content: "$$SCONE::cert.chain$$", mode: 0644}
      - {path: /etc/app/key.pem, content: "$$SCONE::cert:privatekey$$"}
      - {path: /etc/app/key2.pem, content: "$$SCONE::cert.key$$"}
      - {path: /etc/app/pub.pem, content: "$$SCONE::cert:publickey$$"}
      - {path: /etc/app/ca.pem, content: "$$SCONE::ca:pem$$"}
      - {path: /etc/app/signing.pem, content: "$$SCONE::signing:key$$"}
      - {path: /etc/app/signing.pub, content: "$$SCONE::signing:publickey$$"}
      - {path: /etc/app/empty}
secrets:
  - {name: word, kind: ascii, value: "pässword"}
  - {name: token, kind: binary, value: "00ff10"}
  - {name: ca, kind: x509-ca}
  - {name: cert, kind: x509, issuer: ca}
  - {name: signing, kind: private-key, key_type: Ed25519}
"""


def _no_import(session: str, secret: str) -> SecretValue:
    raise AssertionError("no imports expected")


def _decoded(configuration: dict[str, object]) -> dict[str, str]:
    files = configuration["injection_files"]
    assert isinstance(files, list)
    return {f["path"]: base64.b64decode(f["content"]).decode() for f in files}


def test_configuration_shape() -> None:
    session = parse_session(VALID_SESSION)
    values = generate_secrets(session, {}, _no_import)
    configuration = render_configuration(session, "service", values)
    assert set(configuration) == {
        "command",
        "environment",
        "pwd",
        "fspf_key",
        "fspf_tag",
        "injection_files",
    }
    assert configuration["command"] == ["python3", "-B", "/app/rest_api.py"]
    assert configuration["environment"] == {
        "PORT": "4996",
        "DB_PASSWORD": values["db_password"].render(None),
    }
    assert configuration["pwd"] == "/app"
    assert configuration["fspf_key"] == FSPF_KEY
    assert configuration["fspf_tag"] == FSPF_TAG
    files = configuration["injection_files"]
    assert [f["path"] for f in files] == ["/tls/flask.crt", "/tls/flask.key"]
    assert all(f["mode"] == 0o600 for f in files)
    assert _decoded(configuration)["/tls/flask.key"] == values["flask_key"].render(None)


def test_every_format_renders() -> None:
    session = parse_session(FORMATS_SESSION)
    values = generate_secrets(session, {}, _no_import)
    configuration = render_configuration(session, "app", values)
    assert configuration["command"] == ["/bin/app", "--token=00ff10", "pässword"]
    environment = configuration["environment"]
    assert environment["WORD"] == "pässword"
    assert environment["WORD_HEX"] == "pässword".encode().hex()
    assert base64.b64decode(environment["WORD_B64"]).decode() == "pässword"
    assert environment["TOKEN"] == "00ff10"
    assert base64.b64decode(environment["TOKEN_B64"]) == bytes.fromhex("00ff10")
    assert environment["TWO"] == "pässword-pässword"
    assert environment["PLAIN"] == "no variables here, just $ and $$"
    files = _decoded(configuration)
    cert = values["cert"]
    assert files["/etc/app/cert.pem"] == cert.render("crt")
    assert files["/etc/app/chain.pem"] == cert.render("crt") + values["ca"].render("crt")
    assert files["/etc/app/key.pem"] == files["/etc/app/key2.pem"] == cert.render("key")
    assert files["/etc/app/pub.pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert files["/etc/app/ca.pem"] == values["ca"].render(None)
    assert files["/etc/app/signing.pem"].startswith("-----BEGIN PRIVATE KEY-----")
    assert files["/etc/app/signing.pub"] == values["signing"].public_value()
    assert files["/etc/app/empty"] == ""
    modes = {f["path"]: f["mode"] for f in configuration["injection_files"]}
    assert modes["/etc/app/chain.pem"] == 0o644


def test_service_without_image_has_no_files() -> None:
    session = parse_session("name: x\nservices:\n  - {name: s, command: /bin/true}\n")
    configuration = render_configuration(session, "s", {})
    assert configuration["injection_files"] == []
    assert configuration["pwd"] == "/"
    assert configuration["fspf_key"] is None


def test_unknown_service() -> None:
    session = parse_session(VALID_SESSION)
    with pytest.raises(PolicyError) as info:
        render_configuration(session, "nope", {})
    assert "no service 'nope'" in str(info.value)


def test_missing_value_names_path_not_value() -> None:
    session = parse_session(VALID_SESSION)
    values = generate_secrets(session, {}, _no_import)
    del values["flask"]
    with pytest.raises(SecretError) as info:
        render_configuration(session, "service", values)
    assert "images[0].injection_files[0].content" in str(info.value)
    assert "'flask'" in str(info.value)


def test_wrong_kind_value_is_rejected_without_quoting() -> None:
    session = parse_session(VALID_SESSION)
    values = generate_secrets(session, {}, _no_import)
    # A stored value whose kind no longer fits the definition's format.
    values["flask"] = SecretValue("ascii", {"value": "top-secret-material"})
    with pytest.raises(SecretError) as info:
        render_configuration(session, "service", values)
    assert "top-secret-material" not in str(info.value)
    assert "images[0].injection_files[0].content" in str(info.value)
