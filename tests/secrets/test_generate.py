from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from enclavify.errors import SecretError
from enclavify.policy import parse_session
from enclavify.secrets import SecretValue, generate_secrets

SESSION = """
name: ns/flask
secrets:
  - name: api_ca_key
    kind: private-key
  - name: api_ca_cert
    kind: x509-ca
    export_public: true
    private_key: api_ca_key
  - name: intermediate
    kind: x509-ca
    issuer: api_ca_cert
  - name: flask_key
    kind: private-key
  - name: flask
    kind: x509
    private_key: flask_key
    issuer: intermediate
    dns:
      - api
    san: ["ip:127.0.0.1", "dns:api.example"]
    endpoint: server
    valid_for: 30 days
  - name: client
    kind: x509
    issuer: api_ca_cert
    endpoint: client
    key_type: Ed25519
  - name: password
    kind: ascii
  - name: long_password
    kind: ascii
    size: 64
  - name: token
    kind: binary
    size: 16
  - name: rsa
    kind: private-key
    key_type: RSA-2048
  - name: p384
    kind: private-key
    key_type: P-384
"""


def _no_imports(session: str, secret: str) -> SecretValue:
    raise AssertionError(f"unexpected import of {secret} from {session}")


@pytest.fixture(scope="module")
def values() -> dict[str, SecretValue]:
    return generate_secrets(parse_session(SESSION), {}, _no_imports)


def _cert(value: SecretValue) -> x509.Certificate:
    return x509.load_pem_x509_certificate(value.render("crt").encode())


def test_every_secret_gets_a_value(values: dict[str, SecretValue]) -> None:
    assert set(values) == {s.name for s in parse_session(SESSION).secrets}
    assert values["flask"].kind == "x509"
    assert values["api_ca_cert"].kind == "x509-ca"


def test_ascii_and_binary_sizes(values: dict[str, SecretValue]) -> None:
    assert len(values["password"].render(None)) == 20
    assert values["password"].render(None).isalnum()
    assert len(values["long_password"].render(None)) == 64
    assert len(bytes.fromhex(values["token"].render(None))) == 16
    assert values["password"].render(None) != values["long_password"].render(None)[:20]


def test_key_types(values: dict[str, SecretValue]) -> None:
    def load(name: str) -> object:
        return serialization.load_pem_private_key(values[name].render(None).encode(), None)

    ca_key = load("api_ca_key")
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert ca_key.curve.name == "secp256r1"
    p384 = load("p384")
    assert isinstance(p384, ec.EllipticCurvePrivateKey)
    assert p384.curve.name == "secp384r1"
    rsa_key = load("rsa")
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert rsa_key.key_size == 2048
    assert isinstance(_cert(values["client"]).public_key(), ed25519.Ed25519PublicKey)


def test_certificate_uses_referenced_key(values: dict[str, SecretValue]) -> None:
    # The `.key` of a certificate is the private key it names.
    assert values["flask"].render("privatekey") == values["flask_key"].render(None)
    assert values["flask"].render("key") == values["flask_key"].render(None)
    assert values["api_ca_cert"].render("publickey") == values["api_ca_key"].public_value()


def test_leaf_names_and_usage(values: dict[str, SecretValue]) -> None:
    cert = _cert(values["flask"])
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["api", "api.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=6)
    client_usage = _cert(values["client"]).extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(client_usage.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_chain_runs_up_to_root(values: dict[str, SecretValue]) -> None:
    chain = values["flask"].render("chain")
    certificates = x509.load_pem_x509_certificates(chain.encode())
    assert [c.subject.rfc4514_string() for c in certificates] == [
        "CN=flask",
        "CN=intermediate",
        "CN=api_ca_cert",
    ]
    root = certificates[-1]
    assert root.issuer == root.subject
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_chain_verifies_with_openssl(values: dict[str, SecretValue], tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    root = tmp_path / "root.pem"
    root.write_text(values["api_ca_cert"].render("crt"))
    intermediate = tmp_path / "intermediate.pem"
    intermediate.write_text(values["intermediate"].render("crt"))
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(values["flask"].render("crt"))

    result = subprocess.run(
        [
            openssl,
            "verify",
            "-CAfile",
            str(root),
            "-untrusted",
            str(intermediate),
            "-purpose",
            "sslserver",
            "-verify_hostname",
            "api",
            str(leaf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{leaf}: OK" in result.stdout

    # Without the intermediate the leaf must not verify.
    broken = subprocess.run(
        [openssl, "verify", "-CAfile", str(root), str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert broken.returncode != 0

    # The client certificate is not valid for a server.
    client = tmp_path / "client.pem"
    client.write_text(values["client"].render("crt"))
    wrong_purpose = subprocess.run(
        [openssl, "verify", "-CAfile", str(root), "-purpose", "sslserver", str(client)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert wrong_purpose.returncode != 0


def test_unrelated_update_keeps_values(values: dict[str, SecretValue]) -> None:
    updated = parse_session(SESSION + "services:\n  - name: s\n    command: /bin/true\n")
    again = generate_secrets(updated, values, _no_imports)
    assert again == values
    # Export flags do not change a value either.
    exported = parse_session(
        SESSION.replace("    key_type: P-384\n", "    key_type: P-384\n    export_public: true\n")
    )
    assert generate_secrets(exported, values, _no_imports)["p384"] == values["p384"]


def test_changed_definition_regenerates(values: dict[str, SecretValue]) -> None:
    changed = parse_session(SESSION.replace("      - api\n", "      - api2\n"))
    again = generate_secrets(changed, values, _no_imports)
    assert again["flask"] != values["flask"]
    assert again["flask_key"] == values["flask_key"]
    assert again["api_ca_cert"] == values["api_ca_cert"]
    names = _cert(again["flask"]).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "api2" in names.value.get_values_for_type(x509.DNSName)


def test_new_ca_key_reissues_the_chain(values: dict[str, SecretValue]) -> None:
    changed = parse_session(
        SESSION.replace(
            "  - name: api_ca_key\n    kind: private-key\n",
            "  - name: api_ca_key\n    kind: private-key\n    key_type: P-384\n",
        )
    )
    again = generate_secrets(changed, values, _no_imports)
    for name in ("api_ca_key", "api_ca_cert", "intermediate", "flask", "client"):
        assert again[name] != values[name], name
    for name in ("flask_key", "password", "token"):
        assert again[name] == values[name], name


def test_storage_round_trip(values: dict[str, SecretValue]) -> None:
    for value in values.values():
        restored = SecretValue.from_json(value.to_json())
        assert restored == value
        assert restored.fingerprint == value.fingerprint
    with pytest.raises(SecretError):
        SecretValue.from_json("{}")
    with pytest.raises(SecretError):
        SecretValue.from_json("not json")


def test_renderings(values: dict[str, SecretValue]) -> None:
    password = values["password"]
    text = password.render(None)
    assert password.render("hex") == text.encode().hex()
    assert base64.b64decode(password.render("base64")) == text.encode()
    token = values["token"]
    assert base64.b64decode(token.render("base64")).hex() == token.render("hex")
    with pytest.raises(SecretError) as info:
        password.render("crt")
    assert text not in str(info.value)
    assert values["flask"].public_value() == values["flask"].render("crt")
    assert values["flask_key"].public_value().startswith("-----BEGIN PUBLIC KEY-----")


def test_repr_and_errors_hide_values(values: dict[str, SecretValue]) -> None:
    for value in values.values():
        for shown in (repr(value), str(value), f"{value}", repr([value])):
            assert "<redacted>" in shown
            assert "BEGIN" not in shown
        assert values["password"].render(None) not in repr(values)


def test_explicit_values() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    generated = generate_secrets(parse_session(SESSION), {}, _no_imports)
    cert_and_key = generated["flask"].render("chain") + generated["flask"].render("key")
    indented_pem = "\n".join("      " + line for line in cert_and_key.splitlines())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    indented_key = "\n".join("      " + line for line in key_pem.splitlines())
    text = f"""
name: explicit
secrets:
  - name: word
    kind: ascii
    value: correct horse
  - name: blob
    kind: binary
    value: DEADBEEF
  - name: key
    kind: private-key
    value: |
{indented_key}
  - name: cert
    kind: x509
    value: |
{indented_pem}
"""
    values = generate_secrets(parse_session(text), {}, _no_imports)
    assert values["word"].render(None) == "correct horse"
    assert values["blob"].render(None) == "deadbeef"
    assert values["key"].render(None).startswith("-----BEGIN PRIVATE KEY-----")
    assert values["cert"].render("crt") == generated["flask"].render("crt")
    assert values["cert"].render("chain") == generated["flask"].render("chain")
    # A certificate with someone else's key is rejected without quoting either.
    mismatched = text.replace(
        indented_pem,
        "\n".join(
            "      " + line for line in (generated["flask"].render("crt") + key_pem).splitlines()
        ),
    )
    with pytest.raises(SecretError) as info:
        generate_secrets(parse_session(mismatched), {}, _no_imports)
    assert "does not belong" in str(info.value)
    assert "BEGIN" not in str(info.value)


def test_invalid_explicit_key_is_not_quoted() -> None:
    text = """
name: explicit
secrets:
  - name: key
    kind: private-key
    value: "-----BEGIN PRIVATE KEY-----\\nc2VjcmV0LW1hdGVyaWFs\\n-----END PRIVATE KEY-----\\n"
"""
    with pytest.raises(SecretError) as info:
        generate_secrets(parse_session(text), {}, _no_imports)
    assert "c2VjcmV0" not in str(info.value)
    assert "'key'" in str(info.value)


def test_imports_use_the_callback() -> None:
    text = """
name: ns/app
secrets:
  - name: shared
    kind: ascii
    import: {session: ns/other, secret: password}
"""
    calls: list[tuple[str, str]] = []
    provided = SecretValue("ascii", {"value": "from-elsewhere"}, "x")

    def imported(session: str, secret: str) -> SecretValue:
        calls.append((session, secret))
        return provided

    values = generate_secrets(parse_session(text), {}, imported)
    assert values["shared"].render(None) == "from-elsewhere"
    assert calls == [("ns/other", "password")]

    def wrong_kind(session: str, secret: str) -> SecretValue:
        return SecretValue("binary", {"hex": "00"}, "x")

    with pytest.raises(SecretError) as info:
        generate_secrets(parse_session(text), {}, wrong_kind)
    assert "is binary" in str(info.value)


def test_leaf_does_not_outlive_issuer() -> None:
    text = """
name: short
secrets:
  - {name: ca, kind: x509-ca, valid_for: 2 days}
  - {name: leaf, kind: x509, issuer: ca, valid_for: 10 years}
"""
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    values = generate_secrets(parse_session(text), {}, _no_imports, now=now)
    assert _cert(values["leaf"]).not_valid_after_utc == _cert(values["ca"]).not_valid_after_utc
    assert _cert(values["ca"]).not_valid_after_utc == now + dt.timedelta(days=2)


def test_leaf_issued_by_imported_ca() -> None:
    exporter = generate_secrets(
        parse_session(
            "name: ns/pki\nsecrets:\n  - {name: root, kind: x509-ca, export: {session: ns/app}}\n"
        ),
        {},
        _no_imports,
    )
    text = """
name: ns/app
secrets:
  - name: ca
    kind: x509-ca
    import: {session: ns/pki, secret: root}
  - name: server
    kind: x509
    issuer: ca
    dns: [app.internal]
"""
    values = generate_secrets(parse_session(text), {}, lambda session, secret: exporter[secret])
    leaf = _cert(values["server"])
    assert leaf.issuer == _cert(exporter["root"]).subject
    leaf.verify_directly_issued_by(_cert(exporter["root"]))
    assert values["server"].render("chain") == values["server"].render("crt") + exporter[
        "root"
    ].render("crt")
