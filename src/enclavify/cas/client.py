"""The one client of the CAS, used by the command line and by the launcher.

The launcher carries this module into confidential images, so it uses only the standard
library, enclavify's own carried modules and Python 3.8 syntax.

Trust: the client is given the CAS's CA certificate (PEM) and, optionally, its fingerprint
(hex SHA-256 of the DER certificate). When both are given the PEM must match the fingerprint.
When only the fingerprint is given, the client fetches the CA certificate from the CAS once
without verification and accepts it only if its fingerprint matches. Every request then
verifies the server against that CA, host name included.

The launcher imports this module at every confidential start, so it keeps its imports few:
its HTTP/1.1 transport (at the end of the module) runs on :mod:`enclavify.cas.tls` rather than
``http.client``, which imports the ``email`` package and more, and JSON and base64 go through
:mod:`enclavify.jsontext` and :mod:`enclavify.b64`, whose standard counterparts import
:mod:`re`. A TLS handshake is slow too, so one client keeps its connection open between
consecutive requests.
"""

from __future__ import annotations

import _thread
import hashlib
import select
import time

from enclavify import b64, crypto, jsontext, logs
from enclavify.attest import report_data as report_data_module
from enclavify.cas import tls
from enclavify.errors import CasError, CasRejected
from enclavify.values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs about 2 ms at every container start
    from collections.abc import Callable
    from typing import Any

log = logs.get_logger(__name__)

DEFAULT_PORT = 8081
CONFIG_INFO = b"enclavify-config-v1"

# Limits on what the CAS may send, enforced while reading, so that a broken or hostile CAS
# cannot make the client buffer unbounded data.
_MAX_RESPONSE = 16 * 1024 * 1024  # bytes of one response body, chunk framing included
_MAX_LINE = 8 * 1024  # bytes of one status, header or chunk-size line
_MAX_HEAD = 64 * 1024  # bytes of the status line and header fields of one response
_MAX_FIELDS = 100  # header fields of one response, and separately its trailer fields
_MAX_INTERIM = 8  # interim (1xx) responses before the final one
_RECEIVE_SIZE = 64 * 1024

# An idle connection is reused only this many seconds after its last response. The CAS
# (aiohttp) keeps idle connections open far longer, but a proxy in front of it may close
# them sooner, and a short limit makes a close that races the next request rare.
_MAX_IDLE = 5.0

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


class Identity(Value):
    """A client identity: a PEM file holding a private key and its certificate."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[v6]:port`` or ``https://host:port`` into host and port."""
    text = address.strip()
    if "://" in text:
        scheme, _, rest = text.partition("://")
        for delimiter in "/?#":
            rest = rest.partition(delimiter)[0]
        host, port_text = _split_host_port(rest.rpartition("@")[2])
        host = host.lower()
        if scheme.lower() != "https" or not host:
            raise CasError(f"invalid CAS address {address!r}: expected https://HOST[:PORT]")
    else:
        host, port_text = _split_host_port(text)
    if not host:
        raise CasError(f"invalid CAS address {address!r}: no host")
    if not port_text:
        return host, DEFAULT_PORT
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise CasError(f"invalid CAS address {address!r}: bad port {port_text!r}")
    return host, int(port_text)


def _split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        return host, port_text
    return text, ""


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
    begin = pem.find(_PEM_BEGIN)
    end = pem.find(_PEM_END, begin + len(_PEM_BEGIN))
    if begin < 0 or end < 0:
        raise CasError("not a PEM certificate: no complete BEGIN/END CERTIFICATE block")
    try:
        der = b64.decode(b"".join(pem[begin + len(_PEM_BEGIN) : end].split()))
    except ValueError as error:
        raise CasError(f"not a PEM certificate: invalid base64: {error}") from error
    if not der:
        raise CasError("not a PEM certificate: the CERTIFICATE block is empty")
    return hashlib.sha256(der).hexdigest()


class CasClient:
    """A connection profile for one CAS: address, pinned CA and optional client identity.

    Connection failures (refused, reset, timed out) are retried with exponential backoff up
    to ``attempts`` times; a request that may have reached the CAS is not sent again (the
    one exception is described in :meth:`_exchange`). A refusal raises :class:`CasRejected`
    with the CAS's reason, anything else :class:`CasError`.

    ``timeout`` bounds each socket operation (connect, handshake, each send and receive), not a
    whole request, so a CAS that sends a byte at a time can delay a response within the size
    limits.

    Consecutive requests share one TLS connection while the CAS keeps it open. Call
    :meth:`close`, or use the client as a context manager, to close it when done; the client
    stays usable afterwards and opens a new connection on its next request.
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
        self._context: tls.Context | None = None
        # The connection kept open for the next request. Threads may share a client: each
        # takes the idle connection out under the lock, so no two use one connection.
        self._idle: _Connection | None = None
        # _thread rather than threading, whose import costs about 1 ms at every container start.
        self._idle_lock = _thread.allocate_lock()

    def close(self) -> None:
        """Close the connection kept open for the next request, if there is one."""
        with self._idle_lock:
            connection, self._idle = self._idle, None
        if connection is not None:
            connection.close()

    def __enter__(self) -> CasClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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

    def challenge(self) -> bytes:
        """Request a challenge nonce from the CAS and keep the connection open for the evidence."""
        answer = self._request("POST", "/v1/attest/challenge", b"{}", idempotent=True)
        return bytes.fromhex(str(answer["nonce"]))

    def request_configuration(
        self,
        config_id: str,
        produce_evidence: Callable[[bytes], tuple[str, bytes]],
        *,
        attempts: int = 5,
        backoff: float = 0.5,
        nonce: bytes | None = None,
    ) -> dict[str, Any]:
        """Attest to the CAS and return the decrypted configuration of ``config_id``.

        ``produce_evidence(report_data)`` returns ``(evidence_type, evidence_bytes)``. The whole
        exchange (a fresh challenge each time) is retried on connection errors only. ``nonce``,
        from an earlier :meth:`challenge`, serves the first attempt instead of a new
        challenge. The connection to the CAS is closed on return.
        """
        try:
            delay = backoff
            for attempt in range(1, max(1, attempts) + 1):
                try:
                    if nonce is None:
                        nonce = self.challenge()
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
                            "data": b64.encode(evidence),
                        },
                    }
                    answer = self._request(
                        "POST", "/v1/attest", jsontext.dumps(body).encode("utf-8")
                    )
                except CasRejected:
                    raise
                except CasError as error:
                    if attempt >= attempts or not _is_connection_error(error):
                        raise
                    log.debug("attestation attempt %d failed (%s); retrying", attempt, error)
                    time.sleep(delay)
                    delay *= 2
                    nonce = None
                    continue
                return _open_configuration(answer, private_key, nonce)
            raise CasError("attestation failed")  # unreachable: the loop returns or raises
        finally:
            self.close()

    # -- transport ------------------------------------------------------------------------

    def _tls_context(self) -> tls.Context:
        if self._context is not None:
            return self._context
        if self._ca_pem is None:
            self._ca_pem = self._fetch_pinned_ca()
        try:
            context = tls.Context(ca_pem=self._ca_pem.decode("ascii"))
        except (UnicodeDecodeError, tls.TlsError) as error:
            raise CasError(
                f"the CAS CA certificate is not a usable PEM certificate: {error}"
            ) from error
        if self.identity is not None:
            try:
                context.load_identity(self.identity.path)
            except (OSError, tls.TlsError) as error:
                raise CasError(f"cannot load identity {self.identity.path}: {error}") from error
        self._context = context
        return context

    def _fetch_pinned_ca(self) -> bytes:
        """Fetch the CA certificate over unverified TLS and keep it only if it matches the pin."""
        context = tls.Context(ca_pem=None)
        # The unverified connection is closed afterwards, never reused for verified requests.
        status, data = self._exchange(
            context, "GET", "/v1/ca-certificate", None, None, idempotent=True, keep=False
        )
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
        content_type: str = "application/json", *, idempotent: bool = False,
    ) -> dict[str, Any]:
        """Send one request and return the JSON object the CAS returned.

        ``idempotent`` marks a POST that may safely reach the CAS twice. Every GET is
        idempotent already.
        """
        status, data = self._exchange(
            self._tls_context(), method, path, body, content_type,
            idempotent=idempotent or method == "GET",
        )
        try:
            answer = jsontext.loads(data.decode("utf-8")) if data else {}
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
        self, context: tls.Context, method: str, path: str,
        body: bytes | None, content_type: str | None,
        *, idempotent: bool = False, keep: bool = True,
    ) -> tuple[int, bytes]:
        """Send one request and return the response's status and body.

        Only failures to connect are retried, with backoff, so that a request which may have
        reached the CAS is not sent twice. The one exception is a race that reusing an idle
        connection cannot avoid: the CAS may close it just as the request is sent, which shows
        as EOF or a reset before the first byte of the response. Only then, and only for an
        ``idempotent`` request, the request is sent once more on a new connection. Any other
        request fails, because the CAS may have received and acted on it. Reusing only
        connections idle for less than ``_MAX_IDLE`` seconds, with nothing (not even an EOF)
        waiting to be read, keeps that race rare.

        With ``keep`` false the connection is closed afterwards instead of kept for reuse.
        """
        request = _format_request(self._host_header(), method, path, body, content_type)
        connection = self._take_idle(context) if keep else None
        reused = connection is not None
        while True:
            if connection is None:
                connection = self._connect(context)
            try:
                status, data, reusable = connection.exchange(request, method)
            except _NoResponse as error:
                connection.close()
                if reused and idempotent:
                    log.debug(
                        "the CAS closed the idle connection (%s); sending %s %s on a new one",
                        error, method, path,
                    )
                    connection, reused = None, False
                    continue
                raise CasError(f"{method} {path} to the CAS failed: {error}") from error
            except (_ResponseError, OSError) as error:
                connection.close()
                raise CasError(f"{method} {path} to the CAS failed: {error}") from error
            except BaseException:
                connection.close()
                raise
            if keep and reusable:
                self._keep_idle(connection)
            else:
                connection.close()
            return status, data

    def _connect(self, context: tls.Context) -> _Connection:
        """Open a TLS connection, retrying failures to connect with exponential backoff."""
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return _Connection(self._open_socket(context), context)
            except OSError as error:
                if attempt >= self.attempts:
                    raise _ConnectionFailed(
                        f"cannot connect to the CAS at {self.host}:{self.port}"
                        f" after {attempt} attempts: {error}"
                    ) from error
                log.debug("connecting to the CAS failed (%s); retrying in %.2fs", error, delay)
                time.sleep(delay)
                delay *= 2
        raise CasError("unreachable")

    def _open_socket(self, context: tls.Context) -> tls.Connection:
        """Connect and complete the TLS handshake.

        Raises:
            CasError: the handshake failed, for example on certificate verification.
            OSError: connecting failed or timed out (the caller retries).
        """
        try:
            return context.connect(self.host, self.port, self.timeout)
        except tls.CertificateError as error:
            raise CasError(
                f"CAS at {self.host}:{self.port} failed certificate verification:"
                f" {error.verify_message}"
            ) from error
        except tls.TlsError as error:
            raise CasError(f"TLS with the CAS at {self.host}:{self.port} failed: {error}") \
                from error

    def _host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        return host if self.port == 443 else f"{host}:{self.port}"

    def _take_idle(self, context: tls.Context) -> _Connection | None:
        with self._idle_lock:
            connection, self._idle = self._idle, None
        if connection is None:
            return None
        if connection.context is context and connection.is_reusable():
            return connection
        connection.close()
        return None

    def _keep_idle(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        with self._idle_lock:
            if self._idle is None:
                self._idle = connection
                return
        # Another thread kept its connection first, and one idle connection is enough.
        connection.close()


class _ConnectionFailed(CasError):
    """No connection to the CAS could be made."""


def _is_connection_error(error: CasError) -> bool:
    return isinstance(error, _ConnectionFailed)


# Bytes that ``urllib.parse.quote(name, safe="/")`` leaves as they are.
_UNQUOTED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~/"
)


def _quote(name: str) -> str:
    """Percent-encode ``name`` for a URL path exactly as ``urllib.parse.quote(name, safe="/")``."""
    return "".join(
        chr(byte) if byte in _UNQUOTED else f"%{byte:02X}" for byte in name.encode("utf-8")
    )


def _open_configuration(
    answer: dict[str, Any], private_key: bytes, challenge_nonce: bytes
) -> dict[str, Any]:
    try:
        cas_public = bytes.fromhex(str(answer["cas_public_key"]))
        gcm_nonce = bytes.fromhex(str(answer["nonce"]))
        ciphertext = b64.decode(str(answer["ciphertext"]))
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
        configuration = jsontext.loads(plaintext.decode("utf-8"))
    except ValueError:
        # from None: a UnicodeDecodeError keeps the whole plaintext, secrets included, in
        # its ``object`` attribute and quotes a byte of it in its message.
        raise CasError("the configuration from the CAS is not valid JSON") from None
    if not isinstance(configuration, dict):
        raise CasError("the configuration from the CAS is not a JSON object")
    return configuration


# -- HTTP/1.1 over one TLS connection ------------------------------------------------------

_HEX_DIGITS = b"0123456789abcdefABCDEF"
_CLOSED_ERRORS = tls.CLOSED_ERRORS


class _NoResponse(Exception):
    """The connection ended (EOF or reset) before the first byte of the response arrived."""


class _ResponseError(Exception):
    """The response is malformed, incomplete or over a limit.

    The message names what is wrong and never quotes the body, which may contain secrets.
    """


def _format_request(
    host: str, method: str, path: str, body: bytes | None, content_type: str | None
) -> bytes:
    if not path.startswith("/") or any(not " " < character < "\x7f" for character in path):
        raise CasError(f"invalid request path {path!r}: expected printable ASCII from /")
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}",
        "Accept: application/json",
        "Accept-Encoding: identity",
    ]
    if body is not None:
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body)}")
    elif method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head + body if body else head


class _Connection:
    """One TLS connection to the CAS and the bytes received from it but not yet parsed."""

    def __init__(self, sock: tls.Connection, context: tls.Context) -> None:
        self.sock = sock
        self.context = context
        self.idle_since = time.monotonic()
        self._buffer = bytearray()
        self._response_started = False

    def close(self) -> None:
        self.sock.close()

    def is_reusable(self) -> bool:
        """Tell whether this idle connection is recent and has nothing, not even EOF, to read."""
        if time.monotonic() - self.idle_since > _MAX_IDLE:
            return False
        if self._buffer or self.sock.pending():
            return False
        return not _is_readable(self.sock)

    def exchange(self, request: bytes, method: str) -> tuple[int, bytes, bool]:
        """Send ``request`` and read the whole response.

        Returns the status, the body and whether the connection may carry another request.

        Raises:
            _NoResponse: the connection ended before the first byte of the response.
            _ResponseError: the response is malformed, incomplete or over a limit.
            OSError: the connection failed or timed out.
        """
        self._response_started = False
        try:
            self.sock.sendall(request)
        except _CLOSED_ERRORS as error:
            raise _NoResponse(f"sending the request failed: {error}") from error
        version, status, headers = self._read_head()
        body, persistent = self._read_body(method, version, status, headers)
        # Bytes after the end of the response belong to no request, so the connection is
        # out of step with the CAS.
        return status, body, persistent and not self._buffer

    # -- reading --

    def _receive(self) -> bool:
        """Append the next bytes from the socket to the buffer, or return False at EOF."""
        try:
            data = self.sock.recv(_RECEIVE_SIZE)
        except _CLOSED_ERRORS as error:
            if not self._response_started:
                raise _NoResponse(f"the CAS reset the connection: {error}") from error
            raise
        if not data:
            if not self._response_started:
                raise _NoResponse("the CAS closed the connection without a response")
            return False
        self._response_started = True
        self._buffer += data
        return True

    def _read_line(self, what: str) -> bytes:
        """Return the next line, without its line ending, of at most ``_MAX_LINE`` bytes."""
        while True:
            end = self._buffer.find(b"\n", 0, _MAX_LINE)
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if len(self._buffer) >= _MAX_LINE:
                raise _ResponseError(f"the {what} is longer than {_MAX_LINE} bytes")
            if not self._receive():
                raise _ResponseError(f"the CAS closed the connection within the {what}")

    def _read_exact(self, size: int, what: str) -> bytes:
        while len(self._buffer) < size:
            if not self._receive():
                raise _ResponseError(
                    f"the CAS closed the connection after {len(self._buffer)} of {size}"
                    f" bytes of the {what}"
                )
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _read_head(self) -> tuple[bytes, int, dict[bytes, list[bytes]]]:
        """Read the status line and header fields of the final response, skipping 1xx ones."""
        for _ in range(_MAX_INTERIM + 1):
            line = self._read_line("status line")
            version, status = _parse_status_line(line)
            headers = self._read_fields("header", len(line))
            if status == 101:
                raise _ResponseError("the CAS sent HTTP 101 (switching protocols) unrequested")
            if status >= 200:
                return version, status, headers
        raise _ResponseError(f"the CAS sent more than {_MAX_INTERIM} interim (1xx) responses")

    def _read_fields(self, what: str, size: int) -> dict[bytes, list[bytes]]:
        """Read header or trailer fields up to the empty line, with names lowercased."""
        fields: dict[bytes, list[bytes]] = {}
        count = 0
        while True:
            line = self._read_line(f"{what} line")
            size += len(line) + 2
            if size > _MAX_HEAD:
                raise _ResponseError(f"the response {what}s are longer than {_MAX_HEAD} bytes")
            if not line:
                return fields
            count += 1
            if count > _MAX_FIELDS:
                raise _ResponseError(f"the response has more than {_MAX_FIELDS} {what} fields")
            name, colon, value = line.partition(b":")
            # A name with white space, or a line starting with it (the obsolete line
            # folding), is rejected: parsers disagree on what it means.
            if not colon or not name or any(byte in b" \t" for byte in name):
                raise _ResponseError(f"the response has a malformed {what} line")
            fields.setdefault(name.lower(), []).append(value.strip(b" \t"))

    def _read_body(
        self, method: str, version: bytes, status: int, headers: dict[bytes, list[bytes]]
    ) -> tuple[bytes, bool]:
        """Read the body as the headers frame it, and tell whether the connection persists."""
        persistent = version == b"HTTP/1.1" and b"close" not in _tokens(headers, b"connection")
        if method == "HEAD" or status in (204, 304):
            return b"", persistent
        if b"transfer-encoding" in headers:
            codings = _tokens(headers, b"transfer-encoding")
            if codings != [b"chunked"]:
                shown = b", ".join(codings).decode("latin-1")[:60]
                raise _ResponseError(f"unsupported Transfer-Encoding {shown!r}")
            body = self._read_chunked()
            # A response framed both ways may be an attempt to desynchronize the client and
            # the CAS, so the connection carries no further request.
            return body, persistent and b"content-length" not in headers
        if b"content-length" in headers:
            length = _content_length(headers[b"content-length"])
            if length > _MAX_RESPONSE:
                raise _ResponseError(
                    f"the response body of {length} bytes is larger than the limit of"
                    f" {_MAX_RESPONSE} bytes"
                )
            return self._read_exact(length, "response body"), persistent
        return self._read_until_close(), False

    def _read_chunked(self) -> bytes:
        body = bytearray()
        # Counting the chunk framing too bounds the work a server sending tiny chunks with
        # long extensions can cause, not only the memory.
        encoded = 0
        while True:
            line = self._read_line("chunk size line")
            encoded += len(line) + 2
            size_text = line.partition(b";")[0].strip(b" \t")
            if not size_text or len(size_text) > 16 or size_text.strip(_HEX_DIGITS):
                raise _ResponseError("the response has an invalid chunk size")
            size = int(size_text, 16)
            encoded += size + 2
            if encoded > _MAX_RESPONSE:
                raise _ResponseError(
                    f"the chunked response body is larger than the limit of {_MAX_RESPONSE}"
                    f" bytes"
                )
            if size == 0:
                break
            body += self._read_exact(size, "chunk")
            if self._read_line("chunk end"):
                raise _ResponseError("a chunk of the response is longer than its size")
        self._read_fields("trailer", 0)
        return bytes(body)

    def _read_until_close(self) -> bytes:
        while self._receive():
            if len(self._buffer) > _MAX_RESPONSE:
                raise _ResponseError(
                    f"the response body is larger than the limit of {_MAX_RESPONSE} bytes"
                )
        body = bytes(self._buffer)
        self._buffer.clear()
        return body


def _parse_status_line(line: bytes) -> tuple[bytes, int]:
    parts = line.split(b" ", 2)
    if (
        len(parts) < 2
        or not parts[0].startswith(b"HTTP/1.")
        or len(parts[0]) != 8
        or len(parts[1]) != 3
        or not parts[1].isdigit()
        or parts[1] < b"100"
    ):
        # The line is not quoted: if the peer does not speak HTTP it may be anything.
        raise _ResponseError("the response does not start with an HTTP/1.x status line")
    return parts[0], int(parts[1])


def _tokens(headers: dict[bytes, list[bytes]], name: bytes) -> list[bytes]:
    """Return the comma-separated tokens of every ``name`` field, lowercased."""
    return [
        token.strip(b" \t").lower()
        for value in headers.get(name, [])
        for token in value.split(b",")
        if token.strip(b" \t")
    ]


def _content_length(values: list[bytes]) -> int:
    # Repeated or listed values are allowed only when all are the same number.
    lengths = {value.strip(b" \t") for field in values for value in field.split(b",")}
    if len(lengths) != 1:
        raise _ResponseError("the response has conflicting Content-Length fields")
    text = lengths.pop()
    if not text.isdigit() or len(text) > 18:
        raise _ResponseError("the response has an invalid Content-Length field")
    return int(text)


def _is_readable(sock: tls.Connection) -> bool:
    """Tell whether reading ``sock`` would not block (data or EOF waiting)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)
