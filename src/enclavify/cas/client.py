"""The one client of the CAS, used by the command line and by the launcher.

The launcher carries this module into confidential images, so it uses only the standard
library, enclavify's own carried modules and Python 3.8 syntax.

Trust: the client is given the CAS's CA certificate (PEM) and, optionally, its fingerprint
(hex SHA-256 of the DER certificate). When both are given the PEM must match the fingerprint.
When only the fingerprint is given, the client fetches the CA certificate from the CAS once
without verification and accepts it only if its fingerprint matches. Every request then
verifies the server against that CA, host name included.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from enclavify import crypto
from enclavify.attest import report_data as report_data_module
from enclavify.errors import CasError, CasRejected

log = logging.getLogger(__name__)

DEFAULT_PORT = 8081
CONFIG_INFO = b"enclavify-config-v1"

# Responses larger than this are refused rather than read into memory.
_MAX_RESPONSE = 16 * 1024 * 1024

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----"
)


@dataclass(frozen=True)
class Identity:
    """A client identity: a PEM file holding a private key and its certificate."""

    path: str


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[v6]:port`` or ``https://host:port`` into host and port."""
    text = address.strip()
    if "://" in text:
        parsed = urllib.parse.urlsplit(text)
        if parsed.scheme != "https" or not parsed.hostname:
            raise CasError(f"invalid CAS address {address!r}: expected https://HOST[:PORT]")
        return parsed.hostname, parsed.port or DEFAULT_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise CasError(f"invalid CAS address {address!r}: no host")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise CasError(f"invalid CAS address {address!r}: bad port {port_text!r}")
    return host, int(port_text)


def pem_fingerprint(pem: bytes) -> str:
    """Return the hex SHA-256 of the DER encoding of the one certificate in ``pem``.

    A PEM with a second block is rejected rather than fingerprinted by its first: the
    client trusts every certificate in a pinned PEM, so the pin must cover all of them.

    Raises:
        CasError: ``pem`` does not contain exactly one PEM certificate.
    """
    if pem.count(b"-----BEGIN ") != 1:
        raise CasError(
            f"not a PEM certificate: expected exactly one PEM block,"
            f" found {pem.count(b'-----BEGIN ')}"
        )
    match = _PEM_CERTIFICATE.search(pem)
    if match is None:
        raise CasError("not a PEM certificate: no complete BEGIN/END CERTIFICATE block")
    try:
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise CasError(f"not a PEM certificate: invalid base64: {error}") from error
    return hashlib.sha256(der).hexdigest()


class CasClient:
    """A connection profile for one CAS: address, pinned CA and optional client identity.

    Connection failures (refused, reset, timed out) are retried with exponential backoff up
    to ``attempts`` times; a request that reached the CAS is never retried. A refusal raises
    :class:`CasRejected` with the CAS's reason, anything else :class:`CasError`.
    """

    def __init__(
        self,
        address: str,
        *,
        ca_pem: bytes | None = None,
        fingerprint: str | None = None,
        identity: Identity | None = None,
        timeout: float = 10.0,
        attempts: int = 4,
        backoff: float = 0.25,
    ) -> None:
        self.host, self.port = parse_address(address)
        self.identity = identity
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self._fingerprint = fingerprint.lower().replace(":", "") if fingerprint else None
        if ca_pem is None and self._fingerprint is None:
            raise CasError("no CAS certificate: give its CA certificate or its fingerprint")
        if ca_pem is not None and self._fingerprint is not None:
            actual = pem_fingerprint(ca_pem)
            if actual != self._fingerprint:
                raise CasError(
                    f"CAS certificate fingerprint mismatch: expected {self._fingerprint},"
                    f" the given certificate has {actual}"
                )
        self._ca_pem = ca_pem
        self._context: ssl.SSLContext | None = None

    # -- sessions -------------------------------------------------------------------------

    def create_session(self, text: str) -> str:
        """Upload a new session; returns its hash."""
        answer = self._request("POST", "/v1/sessions", text.encode("utf-8"), "application/yaml")
        return str(answer["hash"])

    def update_session(self, text: str) -> str:
        """Upload a session whose ``predecessor`` names the current hash; returns the new hash."""
        return self.create_session(text)

    def get_session(self, name: str) -> dict[str, Any]:
        """Return ``{"name", "hash", "session"}`` with the session redacted."""
        return dict(self._request("GET", "/v1/sessions/" + _quote(name)))

    def session_history(self, name: str) -> list[dict[str, Any]]:
        answer = self._request("GET", "/v1/sessions/" + _quote(name) + "/history")
        return list(answer["history"])

    def public_values(self, name: str) -> dict[str, Any]:
        """Return the session's ``export_public`` secret values by name."""
        answer = self._request("GET", "/v1/values/session=" + _quote(name))
        return dict(answer["values"])

    # -- attestation ----------------------------------------------------------------------

    def request_configuration(
        self,
        config_id: str,
        produce_evidence: Callable[[bytes], tuple[str, bytes]],
        *,
        attempts: int = 5,
        backoff: float = 0.5,
    ) -> dict[str, Any]:
        """Attest to the CAS and return the decrypted configuration of ``config_id``.

        ``produce_evidence(report_data)`` returns ``(evidence_type, evidence_bytes)``. The whole
        exchange (a fresh challenge each time) is retried on connection errors only.
        """
        delay = backoff
        for attempt in range(1, max(1, attempts) + 1):
            try:
                challenge = self._request("POST", "/v1/attest/challenge", b"{}")
                nonce = bytes.fromhex(str(challenge["nonce"]))
                private_key, public_key = crypto.x25519_generate()
                evidence_type, evidence = produce_evidence(
                    report_data_module.bind(nonce, public_key)
                )
                body = {
                    "config_id": config_id,
                    "nonce": nonce.hex(),
                    "public_key": public_key.hex(),
                    "evidence": {
                        "type": evidence_type,
                        "data": base64.b64encode(evidence).decode("ascii"),
                    },
                }
                answer = self._request("POST", "/v1/attest", json.dumps(body).encode("utf-8"))
            except CasRejected:
                raise
            except CasError as error:
                if attempt >= attempts or not _is_connection_error(error):
                    raise
                log.debug("attestation attempt %d failed (%s); retrying", attempt, error)
                time.sleep(delay)
                delay *= 2
                continue
            return _open_configuration(answer, private_key, nonce)
        raise CasError("attestation failed")  # unreachable: the loop returns or raises

    # -- transport ------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        if self._context is not None:
            return self._context
        if self._ca_pem is None:
            self._ca_pem = self._fetch_pinned_ca()
        context = ssl.create_default_context(cadata=self._ca_pem.decode("ascii"))
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        if self.identity is not None:
            try:
                context.load_cert_chain(self.identity.path)
            except (OSError, ssl.SSLError) as error:
                raise CasError(f"cannot load identity {self.identity.path}: {error}") from error
        self._context = context
        return context

    def _fetch_pinned_ca(self) -> bytes:
        """Fetch the CA certificate over unverified TLS and keep it only if it matches the pin."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        status, data = self._exchange(context, "GET", "/v1/ca-certificate", None, None)
        if status != 200:
            raise CasError(f"fetching the CAS CA certificate failed with HTTP {status}")
        actual = pem_fingerprint(data)
        if actual != self._fingerprint:
            raise CasError(
                f"CAS certificate fingerprint mismatch: expected {self._fingerprint},"
                f" the CAS presented {actual}"
            )
        return data

    def _request(
        self, method: str, path: str, body: bytes | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        status, data = self._exchange(self._ssl_context(), method, path, body, content_type)
        try:
            answer = json.loads(data.decode("utf-8")) if data else {}
        except (ValueError, UnicodeDecodeError) as error:
            raise CasError(f"CAS sent an invalid response to {method} {path} (HTTP {status})") \
                from error
        if not isinstance(answer, dict):
            raise CasError(f"CAS sent an invalid response to {method} {path} (HTTP {status})")
        if status >= 400:
            reason = answer.get("error") or f"HTTP {status}"
            raise CasRejected(str(reason), status)
        if status >= 300:
            raise CasError(f"CAS returned unexpected HTTP {status} for {method} {path}")
        return answer

    def _exchange(
        self, context: ssl.SSLContext, method: str, path: str,
        body: bytes | None, content_type: str | None,
    ) -> tuple[int, bytes]:
        """Send one request; only failures to connect are retried, so no write runs twice."""
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            connection = http.client.HTTPSConnection(
                self.host, self.port, context=context, timeout=self.timeout
            )
            try:
                try:
                    connection.connect()
                except ssl.SSLCertVerificationError as error:
                    raise CasError(
                        f"CAS at {self.host}:{self.port} failed certificate verification:"
                        f" {error.verify_message}"
                    ) from error
                except ssl.SSLError as error:
                    raise CasError(f"TLS with the CAS at {self.host}:{self.port} failed: {error}") \
                        from error
                except (TimeoutError, OSError) as error:
                    if attempt >= self.attempts:
                        raise _ConnectionFailed(
                            f"cannot connect to the CAS at {self.host}:{self.port}"
                            f" after {attempt} attempts: {error}"
                        ) from error
                    log.debug("connecting to the CAS failed (%s); retrying in %.2fs", error, delay)
                    time.sleep(delay)
                    delay *= 2
                    continue
                headers = {"Accept": "application/json"}
                if content_type is not None and body is not None:
                    headers["Content-Type"] = content_type
                try:
                    connection.request(method, path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read(_MAX_RESPONSE + 1)
                except (OSError, http.client.HTTPException) as error:
                    raise CasError(f"{method} {path} to the CAS failed: {error}") from error
                if len(data) > _MAX_RESPONSE:
                    raise CasError(
                        f"CAS response to {method} {path} exceeds {_MAX_RESPONSE} bytes"
                    )
                return response.status, data
            finally:
                connection.close()
        raise CasError("unreachable")


class _ConnectionFailed(CasError):
    """No connection to the CAS could be made."""


def _is_connection_error(error: CasError) -> bool:
    return isinstance(error, _ConnectionFailed)


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="/")


def _open_configuration(
    answer: dict[str, Any], private_key: bytes, challenge_nonce: bytes
) -> dict[str, Any]:
    try:
        cas_public = bytes.fromhex(str(answer["cas_public_key"]))
        gcm_nonce = bytes.fromhex(str(answer["nonce"]))
        ciphertext = base64.b64decode(str(answer["ciphertext"]), validate=True)
    except (KeyError, ValueError) as error:
        raise CasError(f"CAS sent a malformed configuration: {error}") from error
    try:
        shared = crypto.x25519_exchange(private_key, cas_public)
    except ValueError as error:
        raise CasError(f"CAS sent an unusable public key: {error}") from error
    key = crypto.hkdf_sha256(shared, salt=challenge_nonce, info=CONFIG_INFO)
    try:
        plaintext = crypto.aes_gcm_decrypt(key, gcm_nonce, ciphertext, b"")
    except ValueError as error:
        raise CasError(f"CAS sent a malformed configuration: {error}") from error
    except crypto.AuthenticationError as error:
        raise CasError("the configuration from the CAS failed authentication") from error
    try:
        configuration = json.loads(plaintext.decode("utf-8"))
    except ValueError:
        # from None: a UnicodeDecodeError keeps the whole plaintext, secrets included, in
        # its ``object`` attribute and quotes a byte of it in its message.
        raise CasError("the configuration from the CAS is not valid JSON") from None
    if not isinstance(configuration, dict):
        raise CasError("the configuration from the CAS is not a JSON object")
    return configuration
