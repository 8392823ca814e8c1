"""Generate the values of a session's secrets.

:func:`generate_secrets` returns a value for every secret of a session. A value from an
earlier version of the session is kept while its definition is unchanged, so an update that
edits a service's command does not replace a certificate. Changing a definition (or a key or
CA it depends on) makes a new value. Imported secrets come from a callback, explicit values
from the session itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import secrets as random_source
import string
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enclavify.errors import SecretError
from enclavify.policy.canonical import session_to_dict
from enclavify.policy.model import SecretDefinition, Session
from enclavify.secrets.certificates import CLOCK_SKEW, PrivateKey, private_key_pem
from enclavify.secrets.value import SecretValue

log = logging.getLogger(__name__)

ImportCallback = Callable[[str, str], SecretValue]

ASCII_ALPHABET = string.ascii_letters + string.digits
EXPLICIT = "explicit"


def generate_secrets(
    session: Session,
    existing: Mapping[str, SecretValue],
    imported: ImportCallback,
    *,
    now: dt.datetime | None = None,
) -> dict[str, SecretValue]:
    """Return a value for every secret of ``session``, keyed by name.

    ``existing`` contains the values of the session's previous version; one is kept when its
    fingerprint matches the current definition. ``imported(session_name, secret_name)``
    returns the value another session exports to this one (and raises if it does not).

    Raises:
        SecretError: a value cannot be generated, an explicit value is invalid, or an
            imported value has the wrong kind. Messages name the secret, never its value.
    """
    clock = now or dt.datetime.now(dt.UTC)
    definitions = {secret.name: secret for secret in session.secrets}
    entries = {entry["name"]: entry for entry in session_to_dict(session)["secrets"]}
    result: dict[str, SecretValue] = {}

    def resolve(name: str) -> SecretValue:
        done = result.get(name)
        if done is not None:
            return done
        definition = definitions.get(name)
        if definition is None:
            raise SecretError(f"secret {name!r} is not defined")
        result[name] = _value_for(
            definition,
            entry=entries[name],
            previous=existing.get(name),
            resolve=resolve,
            imported=imported,
            now=clock,
        )
        return result[name]

    for secret in session.secrets:
        resolve(secret.name)
    return result


def definition_fingerprint(entry: Mapping[str, Any], dependencies: Mapping[str, str]) -> str:
    """Return the fingerprint of a generated secret's definition.

    ``entry`` is the secret in the normalized dictionary form; the export settings are left
    out because publishing a value does not change it. ``dependencies`` maps the
    ``private_key`` and ``issuer`` references to a digest of those values' public parts, so
    a new CA key also makes new certificates.
    """
    material = {k: v for k, v in entry.items() if k not in ("export_public", "export")}
    encoded = json.dumps(
        {"definition": material, "dependencies": dict(dependencies)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def _value_for(
    definition: SecretDefinition,
    *,
    entry: Mapping[str, Any],
    previous: SecretValue | None,
    resolve: Callable[[str], SecretValue],
    imported: ImportCallback,
    now: dt.datetime,
) -> SecretValue:
    name = definition.name
    if definition.import_from is not None:
        value = imported(definition.import_from.session, definition.import_from.secret)
        if value.kind != definition.kind:
            raise SecretError(
                f"secret {name!r} is declared {definition.kind} but the imported secret "
                f"{definition.import_from.secret!r} of session "
                f"{definition.import_from.session!r} is {value.kind}"
            )
        return value
    if definition.value is not None:
        return explicit_value(definition)

    dependencies: dict[str, str] = {}
    for role, reference in (("private_key", definition.private_key), ("issuer", definition.issuer)):
        if reference is not None:
            try:
                public = resolve(reference).public_value() or ""
            except SecretError as exc:
                raise SecretError(f"secret {name!r}: {role} {reference!r}: {exc}") from None
            dependencies[role] = hashlib.sha256(public.encode("utf-8")).hexdigest()
    fingerprint = definition_fingerprint(entry, dependencies)
    if previous is not None and previous.kind == definition.kind:
        if previous.fingerprint == fingerprint:
            log.debug("keeping the value of secret %r: definition unchanged", name)
            return previous
        log.debug("regenerating secret %r: definition changed", name)
    else:
        log.debug("generating secret %r (%s)", name, definition.kind)

    if definition.kind == "ascii":
        size = definition.size or 20
        text = "".join(random_source.choice(ASCII_ALPHABET) for _ in range(size))
        return SecretValue("ascii", {"value": text}, fingerprint)
    if definition.kind == "binary":
        return SecretValue("binary", {"hex": os.urandom(definition.size or 32).hex()}, fingerprint)
    if definition.kind == "private-key":
        key = new_private_key(definition.key_type or "P-256")
        return SecretValue("private-key", {"key": _key_pem(key)}, fingerprint)
    return _certificate(definition, resolve, fingerprint, now)


def new_private_key(key_type: str) -> PrivateKey:
    """Generate a private key of one of the session language's key types."""
    if key_type == "P-256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "P-384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type in ("RSA-2048", "RSA-3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise SecretError(f"unknown key type {key_type!r}")


def _key_pem(key: PrivateKey) -> str:
    return private_key_pem(key).decode("ascii")


def _load_key(pem: str, what: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm, UnicodeEncodeError):
        # The library's message is not passed on: it could quote the material.
        raise SecretError(f"{what} is not an unencrypted PEM private key") from None
    if not isinstance(
        key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)
    ):
        raise SecretError(f"{what} has an unsupported key type")
    return key


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _certificate(
    definition: SecretDefinition,
    resolve: Callable[[str], SecretValue],
    fingerprint: str,
    now: dt.datetime,
) -> SecretValue:
    name = definition.name
    if definition.private_key is not None:
        key = _load_key(resolve(definition.private_key).field("key"), f"private key of {name!r}")
    else:
        key = new_private_key(definition.key_type or "P-256")

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, definition.common_name or name)])
    not_before = now - CLOCK_SKEW
    not_after = now + dt.timedelta(seconds=definition.valid_for or 365 * 86400)
    if definition.issuer is not None:
        issuer_value = resolve(definition.issuer)
        try:
            issuer_cert = x509.load_pem_x509_certificate(issuer_value.field("cert").encode("ascii"))
            issuer_name = issuer_cert.subject
            issuer_not_after = issuer_cert.not_valid_after_utc
        except (ValueError, UnicodeEncodeError):
            # The library's message could quote the material, so it is not passed on.
            raise SecretError(
                f"secret {name!r}: the certificate of issuer {definition.issuer!r} is not a "
                "valid PEM certificate"
            ) from None
        signing_key = _load_key(issuer_value.field("key"), f"key of issuer {definition.issuer!r}")
        # A certificate cannot outlive its issuer and still verify.
        not_after = min(not_after, issuer_not_after)
        chain = issuer_value.field("cert") + issuer_value.field("chain")
        authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key())
    else:
        signing_key = key
        issuer_name = subject
        chain = ""
        authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())

    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(authority, critical=False)
    )
    if definition.kind == "x509-ca":
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(_key_usage(certificate_signing=True), critical=True)
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        ).add_extension(
            _key_usage(certificate_signing=False, rsa_key=isinstance(key, rsa.RSAPrivateKey)),
            critical=True,
        )
        usages = {
            "server": [ExtendedKeyUsageOID.SERVER_AUTH],
            "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
            None: [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        }[definition.endpoint]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        alternative_names = _alternative_names(definition)
        if alternative_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(alternative_names), critical=False
            )

    certificate = builder.sign(signing_key, _signature_hash(signing_key))
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return SecretValue(
        definition.kind, {"cert": cert_pem, "key": _key_pem(key), "chain": chain}, fingerprint
    )


def _key_usage(*, certificate_signing: bool, rsa_key: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certificate_signing,
        crl_sign=certificate_signing,
        encipher_only=False,
        decipher_only=False,
    )


def _alternative_names(definition: SecretDefinition) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for entry in [f"dns:{name}" for name in definition.dns] + list(definition.san):
        if entry in seen:
            continue
        seen.add(entry)
        kind, _, rest = entry.partition(":")
        if kind == "dns":
            names.append(x509.DNSName(rest))
        else:
            names.append(x509.IPAddress(ipaddress.ip_address(rest)))
    return names


def explicit_value(definition: SecretDefinition) -> SecretValue:
    """Turn a secret's explicit ``value`` into a :class:`SecretValue`.

    Raises:
        SecretError: the value does not fit the kind (the message never quotes it).
    """
    text = definition.value or ""
    what = f"value of secret {definition.name!r}"
    if definition.kind == "ascii":
        return SecretValue("ascii", {"value": text}, EXPLICIT)
    if definition.kind == "binary":
        return SecretValue("binary", {"hex": text.lower()}, EXPLICIT)
    if definition.kind == "private-key":
        return SecretValue("private-key", {"key": _key_pem(_load_key(text, what))}, EXPLICIT)

    certificates: list[x509.Certificate] = []
    key_blocks: list[str] = []
    for block in _pem_blocks(text, what):
        if block.startswith("-----BEGIN CERTIFICATE-----"):
            try:
                certificates.append(x509.load_pem_x509_certificate(block.encode("ascii")))
            except ValueError:
                raise SecretError(f"{what} contains an invalid certificate") from None
        elif "PRIVATE KEY-----" in block.splitlines()[0]:
            key_blocks.append(block)
    if not certificates or len(key_blocks) != 1:
        raise SecretError(f"{what} must hold a PEM certificate, its issuers and one private key")
    key = _load_key(key_blocks[0], what)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if certificates[0].public_key().public_bytes(encoding, public) != key.public_key().public_bytes(
        encoding, public
    ):
        raise SecretError(f"{what}: the private key does not belong to the first certificate")
    pems = [c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certificates]
    return SecretValue(
        definition.kind,
        {"cert": pems[0], "key": _key_pem(key), "chain": "".join(pems[1:])},
        EXPLICIT,
    )


def _pem_blocks(text: str, what: str) -> list[str]:
    blocks: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("-----BEGIN "):
            current = [stripped]
        elif current is not None:
            current.append(stripped)
            if stripped.startswith("-----END "):
                blocks.append("\n".join(current) + "\n")
                current = None
    if current is not None:
        raise SecretError(f"{what} has an unterminated PEM block")
    return blocks
