"""A generated, explicit or imported secret value, and how it is rendered.

A :class:`SecretValue` holds the material as text:

- ``ascii``: ``value``, the string;
- ``binary``: ``hex``, the bytes in lower-case hex;
- ``private-key``: ``key``, the private key as unencrypted PKCS #8 PEM;
- ``x509-ca`` and ``x509``: ``cert`` (PEM), ``key`` (the certificate's private key, PKCS #8
  PEM) and ``chain`` (the issuing certificates up to and including the root, PEM, empty for a
  self-signed certificate).

Its ``repr`` and ``str`` never show the material, and neither does any error raised here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import load_pem_x509_certificate

from enclavify.errors import SecretError

# Formats each kind can be rendered in; None is the default rendering.
FORMATS: Mapping[str, tuple[str | None, ...]] = {
    "ascii": (None, "hex", "base64"),
    "binary": (None, "hex", "base64"),
    "private-key": (None, "pem", "privatekey", "key", "publickey"),
    "x509-ca": (None, "crt", "pem", "privatekey", "key", "chain", "publickey"),
    "x509": (None, "crt", "pem", "privatekey", "key", "chain", "publickey"),
}

# The older dot suffixes: `$$SCONE::flask.crt$$` is `$$SCONE::flask:crt$$`.
DOT_SUFFIXES: Mapping[str, str] = {
    "crt": "crt",
    "key": "privatekey",
    "chain": "chain",
    "hex": "hex",
}

_FIELDS: Mapping[str, tuple[str, ...]] = {
    "ascii": ("value",),
    "binary": ("hex",),
    "private-key": ("key",),
    "x509-ca": ("cert", "key", "chain"),
    "x509": ("cert", "key", "chain"),
}

_JSON_VERSION = 1


class SecretValue:
    """The value of one secret.

    ``fingerprint`` identifies the definition the value was made from (see
    :func:`enclavify.secrets.definition_fingerprint`); an empty string means unknown.
    """

    __slots__ = ("_data", "fingerprint", "kind")

    def __init__(self, kind: str, data: Mapping[str, str], fingerprint: str = "") -> None:
        fields = _FIELDS.get(kind)
        if fields is None:
            raise SecretError(f"unknown secret kind {kind!r}")
        if set(data) != set(fields) or not all(isinstance(v, str) for v in data.values()):
            raise SecretError(f"a {kind} secret value needs exactly the fields {list(fields)}")
        self.kind = kind
        self._data = dict(data)
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        return f"SecretValue(kind={self.kind!r}, <redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretValue):
            return NotImplemented
        return (self.kind, self._data, self.fingerprint) == (
            other.kind,
            other._data,
            other.fingerprint,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.fingerprint, tuple(sorted(self._data.items()))))

    def field(self, name: str) -> str:
        """Return one field of the material (see the module docstring for the names)."""
        try:
            return self._data[name]
        except KeyError:
            raise SecretError(f"a {self.kind} secret has no field {name!r}") from None

    def with_fingerprint(self, fingerprint: str) -> SecretValue:
        return SecretValue(self.kind, self._data, fingerprint)

    # Storage -------------------------------------------------------------------------

    def to_json(self) -> str:
        """Encode for storage. The result contains the secret; the caller encrypts it."""
        return json.dumps(
            {
                "format": _JSON_VERSION,
                "kind": self.kind,
                "data": self._data,
                "fingerprint": self.fingerprint,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SecretValue:
        """Decode what :meth:`to_json` produced.

        Raises:
            SecretError: the text is not a stored secret value of a known format.
        """
        try:
            obj: Any = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise SecretError("stored secret value is not valid JSON") from None
        if (
            not isinstance(obj, dict)
            or obj.get("format") != _JSON_VERSION
            or not isinstance(obj.get("kind"), str)
            or not isinstance(obj.get("data"), dict)
            or not isinstance(obj.get("fingerprint"), str)
        ):
            raise SecretError("stored secret value has an unknown layout")
        return cls(obj["kind"], obj["data"], obj["fingerprint"])

    # Rendering -----------------------------------------------------------------------

    def render(self, fmt: str | None = None) -> str:
        """Render the value for a ``$$SCONE::name:fmt$$`` variable.

        ``ascii`` renders as itself, ``binary`` as hex; ``hex`` and ``base64`` encode the
        bytes (the UTF-8 bytes for ``ascii``). Keys render as PKCS #8 PEM, certificates as PEM;
        ``privatekey`` (or ``key``) is a certificate's private key, ``chain`` the certificate
        followed by its issuers up to the root and ``publickey`` the SubjectPublicKeyInfo PEM.

        Raises:
            SecretError: ``fmt`` is not available for this kind.
        """
        if fmt not in FORMATS[self.kind]:
            raise SecretError(f"format {fmt!r} is not available for {self.kind} secrets")
        if self.kind in ("ascii", "binary"):
            raw = (
                self._data["value"].encode("utf-8")
                if self.kind == "ascii"
                else bytes.fromhex(self._data["hex"])
            )
            if fmt == "base64":
                return base64.b64encode(raw).decode("ascii")
            if fmt == "hex" or self.kind == "binary":
                return raw.hex()
            return self._data["value"]
        if fmt == "publickey":
            return self._public_key_pem()
        if self.kind == "private-key" or fmt in ("privatekey", "key"):
            return self._data["key"]
        if fmt == "chain":
            return self._data["cert"] + self._data["chain"]
        return self._data["cert"]

    def public_value(self) -> str | None:
        """Return what ``export_public`` publishes: a certificate, a public key or the value.

        For ``ascii`` and ``binary`` secrets the value itself is returned (hex for binary):
        marking one ``export_public`` is a request to publish it.
        """
        if self.kind in ("x509-ca", "x509"):
            return self._data["cert"]
        if self.kind == "private-key":
            return self._public_key_pem()
        return self.render(None)

    def _public_key_pem(self) -> str:
        try:
            if self.kind == "private-key":
                private = serialization.load_pem_private_key(
                    self._data["key"].encode("ascii"), password=None
                )
                public = private.public_key()
            else:
                public = load_pem_x509_certificate(self._data["cert"].encode("ascii")).public_key()
        except (ValueError, TypeError):
            # The library's message could quote the material, so it is not passed on.
            raise SecretError(f"stored {self.kind} value is not valid PEM") from None
        except UnsupportedAlgorithm:
            raise SecretError(f"stored {self.kind} value has an unsupported key type") from None
        return public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
