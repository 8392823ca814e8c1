from __future__ import annotations

import json

import pytest
import yaml

from enclavify.errors import PolicyError
from enclavify.policy import (
    parse_session,
    redacted,
    session_from_dict,
    session_hash,
    session_to_dict,
)

from .conftest import FSPF_KEY, MRENCLAVE, VALID_SESSION


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def test_valid_session_fields() -> None:
    session = parse_session(VALID_SESSION)
    assert session.name == "my_namespace-1/flask"
    assert session.namespace == "my_namespace-1"
    assert session.version == "0.3"
    assert session.predecessor is None
    assert session.access_policy.read == ("CREATOR",)
    assert session.access_policy.update == ("CREATOR",)
    service = session.services[0]
    assert service.command == ("python3", "-B", "/app/rest_api.py")
    assert service.attestation.mrenclave == (MRENCLAVE,)
    assert dict(service.environment) == {"PORT": "4996", "DB_PASSWORD": "$$SCONE::db_password$$"}
    assert service.pwd == "/app"
    assert session.images[0].injection_files[0].path == "/tls/flask.crt"
    assert session.images[0].injection_files[0].content == "$$SCONE::flask.crt$$"
    assert session.images[0].injection_files[0].mode == 0o600
    assert session.attestation.mode == "simulation"
    assert session.attestation.accepts_simulation


def test_bytes_input_is_accepted() -> None:
    assert parse_session(VALID_SESSION.encode()) == parse_session(VALID_SESSION)


def test_round_trip_through_dict_and_yaml() -> None:
    session = parse_session(VALID_SESSION)
    as_dict = session_to_dict(session)
    assert session_from_dict(json.loads(json.dumps(as_dict))) == session
    assert parse_session(yaml.safe_dump(as_dict)) == session
    assert session_hash(parse_session(yaml.safe_dump(as_dict))) == session_hash(session)


def test_hash_is_stable_and_sensitive() -> None:
    session = parse_session(VALID_SESSION)
    digest = session_hash(session)
    assert len(digest) == 64
    assert digest == session_hash(parse_session(VALID_SESSION))
    # Equivalent spellings give the same hash.
    spelled = _edit(
        VALID_SESSION,
        "command: python3 -B /app/rest_api.py",
        "command: [python3, '-B', /app/rest_api.py]",
    )
    assert session_hash(parse_session(spelled)) == digest
    # Any change of meaning gives a different hash.
    for old, new in [
        ("size: 24", "size: 25"),
        ("PORT: 4996", "PORT: 4997"),
        ("mode: simulation", "mode: hardware"),
        ('version: "0.3"', 'version: "0.4"'),
    ]:
        assert session_hash(parse_session(_edit(VALID_SESSION, old, new))) != digest


def test_legacy_and_new_measurement_forms_agree() -> None:
    legacy = parse_session(VALID_SESSION)
    new = parse_session(
        _edit(
            VALID_SESSION,
            f'mrenclaves: ["{MRENCLAVE}"]',
            f"attestation: {{mrenclave: [{MRENCLAVE.upper()}]}}",
        )
    )
    assert new == legacy


def test_tdx_and_snp_measurements() -> None:
    text = _edit(
        VALID_SESSION,
        f'mrenclaves: ["{MRENCLAVE}"]',
        f"attestation: {{mrtd: ['{'cd' * 48}'], snp_measurement: ['{'ef' * 48}']}}",
    )
    service = parse_session(text).services[0]
    assert service.attestation.mrtd == ("cd" * 48,)
    assert service.attestation.snp_measurement == ("ef" * 48,)
    assert service.attestation.mrenclave == ()


def test_redacted_hides_key_material_only() -> None:
    text = VALID_SESSION.replace(
        "    kind: ascii\n    size: 24", "    kind: ascii\n    value: hunter2-very-secret"
    )
    view = redacted(parse_session(text))
    encoded = json.dumps(view)
    assert "hunter2-very-secret" not in encoded
    assert FSPF_KEY not in encoded
    assert view["secrets"][0]["value"] == "<redacted>"
    assert view["services"][0]["fspf_key"] == "<redacted>"
    assert view["services"][0]["fspf_tag"] == "22" * 16
    assert view["images"][0]["injection_files"][0]["content"] == "$$SCONE::flask.crt$$"


def test_defaults_for_minimal_session() -> None:
    session = parse_session("name: lonely")
    assert session.namespace is None
    assert session.services == ()
    assert session.attestation.mode == "hardware"
    assert not session.attestation.accepts_simulation


REJECTIONS = [
    # (old, new, expected path, words in the message)
    ("name: my_namespace-1/flask", "name: my namespace/flask", "name", "invalid session name"),
    ("name: my_namespace-1/flask", "name: a//b", "name", "invalid session name"),
    ("name: my_namespace-1/flask", "name: a/../b", "name", "invalid session name"),
    ('version: "0.3"', "version: 0.3", "version", "quote it"),
    ('version: "0.3"', 'version: "0.3"\ncolour: blue', "colour", "unknown key"),
    ("    pwd: /app", "    pwd: /app\n    user: root", "services[0].user", "unknown key"),
    ("    pwd: /app", "    pwd: app", "services[0].pwd", "absolute"),
    ("      PORT: 4996", "      HOME: [a]", "services[0].environment.HOME", "expected a string"),
    ("      PORT: 4996", "      HOME: true", "services[0].environment.HOME", "expected a string"),
    ("command: python3 -B /app/rest_api.py", "command: ''", "services[0].command", "empty"),
    (
        "command: python3 -B /app/rest_api.py",
        "command: [python3, 3]",
        "services[0].command[1]",
        "string",
    ),
    (f'fspf_key: "{FSPF_KEY}"', 'fspf_key: "1234"', "services[0].fspf_key", "32 bytes"),
    (
        'fspf_tag: "' + "22" * 16 + '"',
        'fspf_tag: "' + "zz" * 16 + '"',
        "services[0].fspf_tag",
        "16 bytes",
    ),
    (
        f'mrenclaves: ["{MRENCLAVE}"]',
        'mrenclaves: ["abcd"]',
        "services[0].mrenclaves[0]",
        "32 bytes",
    ),
    (
        f'mrenclaves: ["{MRENCLAVE}"]',
        "attestation: {mrtd: [" + "ab" * 32 + "]}",
        "services[0].attestation.mrtd[0]",
        "48 bytes",
    ),
    (
        f'mrenclaves: ["{MRENCLAVE}"]',
        "attestation: {mrfoo: []}",
        "services[0].attestation.mrfoo",
        "unknown key",
    ),
    ("image_name: flask_image", "image_name: other_image", "services[0].image_name", "not defined"),
    (
        "- path: /tls/flask.crt",
        "- path: tls/flask.crt",
        "images[0].injection_files[0].path",
        "absolute",
    ),
    (
        "- path: /tls/flask.crt",
        "- path: /tls/../etc/passwd",
        "images[0].injection_files[0].path",
        "'..'",
    ),
    (
        "- path: /tls/flask.key",
        "- path: /tls/flask.crt",
        "images[0].injection_files[1].path",
        "injected twice",
    ),
    (
        "content: $$SCONE::flask.crt$$",
        "content: $$SCONE::nope.crt$$",
        "images[0].injection_files[0].content",
        "'nope' is not defined",
    ),
    (
        "content: $$SCONE::flask.crt$$",
        "content: $$SCONE::db_password:crt$$",
        "images[0].injection_files[0].content",
        "not available",
    ),
    (
        "content: $$SCONE::flask.crt$$",
        "content: $$SCONE::flask.pem$$",
        "images[0].injection_files[0].content",
        "malformed",
    ),
    (
        'DB_PASSWORD: "$$SCONE::db_password$$"',
        'DB_PASSWORD: "$$SCONE::missing$$"',
        "services[0].environment.DB_PASSWORD",
        "not defined",
    ),
    (
        "command: python3 -B /app/rest_api.py",
        "command: python3 $$SCONE::gone$$",
        "services[0].command[1]",
        "not defined",
    ),
    ("issuer: api_ca_cert", "issuer: flask_key", "secrets[4].issuer", "x509-ca"),
    ("private_key: flask_key", "private_key: nothing", "secrets[4].private_key", "private-key"),
    ("  - name: flask_key\n", "  - name: api_ca_key\n", "secrets[3].name", "duplicate"),
    ("    kind: ascii", "    kind: password", "secrets[0].kind", "unknown secret kind"),
    ("    size: 24", "    size: big", "secrets[0].size", "integer"),
    ("    size: 24", "    key_type: P-256", "secrets[0].key_type", "unknown key"),
    ("      - api\n", "      - api\n    valid_for: forever\n", "secrets[4].valid_for", "duration"),
    ("      - api\n", "      - api\n    san: [url:x]\n", "secrets[4].san[0]", "dns:NAME"),
    (
        "      - api\n",
        "      - api\n    san: ['ip:300.1.1.1']\n",
        "secrets[4].san[0]",
        "IP address",
    ),
    (
        "      - api\n",
        "      - api\n    endpoint: both\n",
        "secrets[4].endpoint",
        "server or client",
    ),
    ("      - api\n", "      - 'bad name'\n", "secrets[4].dns[0]", "DNS name"),
    ("mode: simulation", "mode: emulation", "security.attestation.mode", "unknown mode"),
    (
        "mode: simulation",
        "mode: simulation\n    tolerate: [all]",
        "security.attestation.tolerate[0]",
        "unknown toleration",
    ),
    (
        "mode: simulation",
        "mode: simulation\n    ignore_advisories: '*'",
        "security.attestation.ignore_advisories",
        "debug-mode",
    ),
    (
        "mode: simulation",
        "mode: simulation\n    ignore_advisories: {}",
        "security.attestation.ignore_advisories",
        "list",
    ),
    ('version: "0.3"', 'version: "0.3"\npredecessor: abc', "predecessor", "32 bytes"),
    (
        'version: "0.3"',
        'version: "0.3"\naccess_policy: {read: [SOMEONE]}',
        "access_policy.read[0]",
        "32 bytes",
    ),
    (
        'version: "0.3"',
        'version: "0.3"\naccess_policy: {read: [NONE, CREATOR]}',
        "access_policy.read",
        "NONE",
    ),
    (
        "  - name: service\n",
        "  - name: service\n    fspf_only: 1\n",
        "services[0].fspf_only",
        "unknown key",
    ),
    ("    fspf_tag: ", "    fspf_tagx: ", "services[0].fspf_tagx", "unknown key"),
    ("mode: simulation", "mode: simulation\nimages: []", "", "duplicate key"),
]


@pytest.mark.parametrize(("old", "new", "path", "words"), REJECTIONS)
def test_rejection_names_path(old: str, new: str, path: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_session(_edit(VALID_SESSION, old, new))
    assert info.value.path == path
    assert words in str(info.value)


REJECTED_DOCUMENTS = [
    # (document, expected path, words in the message)
    pytest.param(
        "\n".join(line for line in VALID_SESSION.splitlines() if "fspf_tag" not in line),
        "services[0].fspf_tag",
        "",
        id="fspf-key-without-tag",
    ),
    pytest.param(
        "name: cycle\nsecrets:\n  - {name: a, kind: x509-ca, issuer: b}\n"
        "  - {name: b, kind: x509-ca, issuer: a}\n",
        "secrets[0].issuer",
        "",
        id="issuer-cycle",
    ),
    pytest.param("- name: x", "", "expected a mapping", id="not-a-mapping"),
    pytest.param("version: '1'", "name", "", id="missing-name"),
]


@pytest.mark.parametrize(("document", "path", "words"), REJECTED_DOCUMENTS)
def test_rejected_document_names_path(document: str, path: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_session(document)
    assert info.value.path == path
    assert words in str(info.value)


def test_file_mode_spellings() -> None:
    for spelled, expected in [
        ("0644", 0o644),
        ("'0640'", 0o640),
        ("'600'", 0o600),
        ("0o400", 0o400),
    ]:
        text = _edit(
            VALID_SESSION,
            "        content: $$SCONE::flask.crt$$",
            f"        content: $$SCONE::flask.crt$$\n        permission: {spelled}",
        )
        assert parse_session(text).images[0].injection_files[0].mode == expected
    bad = _edit(
        VALID_SESSION,
        "        content: $$SCONE::flask.crt$$",
        "        content: x\n        mode: '0999'",
    )
    with pytest.raises(PolicyError) as info:
        parse_session(bad)
    assert info.value.path == "images[0].injection_files[0].mode"


def test_explicit_values_are_checked() -> None:
    text = _edit(VALID_SESSION, "    kind: ascii\n    size: 24", "    kind: binary\n    value: xyz")
    with pytest.raises(PolicyError) as info:
        parse_session(text)
    assert info.value.path == "secrets[0].value"
    assert "xyz" not in str(info.value)


def test_import_and_export_forms() -> None:
    text = """
name: ns/app
secrets:
  - name: shared
    kind: ascii
    export: {session: ns/other}
  - name: theirs
    kind: private-key
    import: {session: ns/other, secret: key}
"""
    session = parse_session(text)
    assert session.secrets[0].export == ("ns/other",)
    assert session.secrets[1].import_from is not None
    assert session.secrets[1].import_from.session == "ns/other"
    assert session.secrets[1].key_type is None
    bad = text.replace("secret: key}", "secret: key}\n    key_type: P-384")
    with pytest.raises(PolicyError) as info:
        parse_session(bad)
    assert info.value.path == "secrets[1].key_type"


def test_repr_hides_key_material() -> None:
    text = (
        VALID_SESSION.replace(
            "    kind: ascii\n    size: 24", "    kind: ascii\n    value: hunter2-very-secret"
        )
        + "volumes:\n  - {name: data, fspf_key: '"
        + "99" * 32
        + "', fspf_tag: '"
        + "88" * 16
        + "'}\n"
    )
    session = parse_session(text)
    shown = repr(session) + str(session)
    assert "hunter2-very-secret" not in shown
    assert FSPF_KEY not in shown
    assert "99" * 32 not in shown
    assert "db_password" in shown
