"""TLS client connections for the CAS client, made with CPython's ``_ssl`` and ``_socket``.

The launcher connects to the CAS at every confidential start. Importing :mod:`ssl` and
:mod:`socket` took about 12 ms of that start (measured in a container), most of it for what
they import: :mod:`enum` and the conversion of their constants to enums, and :mod:`base64`
with :mod:`re`. The TLS work itself is done in the ``_ssl`` extension, which imports nothing.
So this module makes the calls that :mod:`ssl` makes on ``_ssl``, and only those:

* a context is ``_ssl._SSLContext(PROTOCOL_TLS_CLIENT)``, whose defaults the extension sets
  (TLS 1.2 or later, certificate and host name checks on) and which :class:`ssl.SSLContext`
  is a subclass of;
* a connection is the context's ``_wrap_socket`` over a connected ``_socket.socket`` (of a
  subclass, because ``_ssl`` refers to it weakly), then
  ``do_handshake``, ``read``, ``write`` and ``pending``, with a ragged EOF read as the end,
  as ``ssl.SSLSocket`` does by default.

The exceptions are the ones :mod:`ssl` exports, which are ``_ssl``'s own classes. A TLS
connection to a local server worked this way on CPython 3.8 to 3.13. A Python whose ``_ssl``
lacks ``_wrap_socket`` gets connections made with :mod:`ssl` and :mod:`socket` instead, which
behave the same, and the tests run the client both ways.

NOTE: ``_wrap_socket`` is private to CPython. A later release that keeps the name but changes
its arguments would make connecting fail with a TypeError rather than fall back.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

import _socket
import _ssl

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

CertificateError = _ssl.SSLCertVerificationError
TlsError = _ssl.SSLError
# Errors of a connection that the peer closed or reset.
CLOSED_ERRORS = (ConnectionError, _ssl.SSLZeroReturnError, _ssl.SSLEOFError)

# Whether connections are made on _ssl directly; False means with the ssl module.
DIRECT = callable(getattr(_ssl._SSLContext, "_wrap_socket", None))


class Context:
    """The trust and identity of client connections: a CA certificate or none, a client key.

    ``ca_pem`` is the only CA trusted, and the server's certificate must name the host.
    Without it the server is not verified at all, for fetching a certificate that the caller
    checks against a pin.

    Raises:
        TlsError: ``ca_pem`` contains no usable certificate.
    """

    def __init__(self, *, ca_pem: str | None) -> None:
        if DIRECT:
            context: Any = _ssl._SSLContext(_ssl.PROTOCOL_TLS_CLIENT)
        else:
            import ssl  # noqa: PLC0415 - only on a Python without the direct calls

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if ca_pem is None:
            context.check_hostname = False
            context.verify_mode = _ssl.CERT_NONE
        else:
            context.verify_mode = _ssl.CERT_REQUIRED
            context.check_hostname = True
            context.load_verify_locations(None, None, ca_pem)
        self._context = context

    def load_identity(self, path: str) -> None:
        """Present the client key and certificate in the PEM file ``path`` to servers.

        Raises:
            OSError, TlsError: the file cannot be read or lacks a matching key and certificate.
        """
        self._context.load_cert_chain(path)

    def connect(self, host: str, port: int, timeout: float) -> Connection:
        """Connect to ``host`` and ``port`` and complete the TLS handshake.

        ``timeout`` bounds connecting and each later send and receive.

        Raises:
            CertificateError: the server's certificate failed verification.
            TlsError: the handshake failed otherwise.
            OSError: connecting failed or timed out.
        """
        if not DIRECT:
            return self._connect_with_ssl(host, port, timeout)
        sock = _open_socket(host, port, timeout)
        try:
            # The host name as ssl sends and checks it: IDNA-encoded, which changes nothing
            # in an ASCII name or an IP address.
            name = host if host.isascii() else host.encode("idna").decode("ascii")
            session = self._context._wrap_socket(sock, False, name)
            session.do_handshake()
        except BaseException:
            sock.close()
            raise
        return Connection(sock, session.read, session.write, session.pending)

    def _connect_with_ssl(self, host: str, port: int, timeout: float) -> Connection:
        import socket  # noqa: PLC0415 - only on a Python without the direct calls

        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            wrapped = self._context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return Connection(wrapped, wrapped.recv, wrapped.send, wrapped.pending)


class Connection:
    """One TLS connection: send, receive and close, as on an ``ssl.SSLSocket``."""

    def __init__(
        self,
        sock: Any,
        read: Callable[[int], bytes],
        write: Callable[[memoryview], int],
        pending: Callable[[], int],
    ) -> None:
        self._sock = sock
        self._read = read
        self._write = write
        self.pending = pending

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._write(view) :]

    def recv(self, size: int) -> bytes:
        """Return up to ``size`` bytes, or b"" once the server closed the connection."""
        try:
            return self._read(size)
        except _ssl.SSLEOFError:
            # A close without TLS's close_notify: ssl.SSLSocket reads it as the end too.
            return b""

    def close(self) -> None:
        self._sock.close()


class _Socket(_socket.socket):
    """A socket that ``_ssl`` can keep a weak reference to, as to a ``socket.socket``."""

    __slots__ = ("__weakref__",)


def _open_socket(host: str, port: int, timeout: float) -> _Socket:
    """Connect a TCP socket to the first address of ``host`` that accepts, as socket does."""
    failure: OSError | None = None
    # getaddrinfo encodes a str host with the IDNA codec, whose import (with re and
    # stringprep) took about 10 ms in a container. An ASCII name goes as bytes, unchanged.
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    for family, kind, protocol, _, address in _socket.getaddrinfo(
        name, port, 0, _socket.SOCK_STREAM
    ):
        sock = _Socket(family, kind, protocol)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError as error:
            sock.close()
            failure = error
            continue
        return sock
    raise failure or OSError(f"no address found for {host!r}")
