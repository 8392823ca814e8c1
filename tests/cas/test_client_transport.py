"""The client's HTTP/1.1 transport against a scripted TLS server on 127.0.0.1.

The server replies to each request with the next step of a script, as raw bytes, so each test
controls framing, limits, closes and connection reuse exactly.
"""

from __future__ import annotations

import base64
import datetime
import json
import socket
import ssl
import subprocess
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from enclavify import crypto
from enclavify.cas import client as client_module
from enclavify.cas.client import CONFIG_INFO, CasClient, _quote, parse_address
from enclavify.cas.pki import ServerPki, ensure_server_pki
from enclavify.errors import CasError, CasRejected
from enclavify.secrets.certificates import private_key_pem, self_signed_certificate

# Every test runs with both ways enclavify.cas.tls makes connections.
pytestmark = pytest.mark.usefixtures("each_tls_path")
LIMIT = 16 * 1024 * 1024
REQUEST_SECRET = "request-secret-4f1c"
RESPONSE_SECRET = b"response-secret-9a7e"


@dataclass
class Step:
    """What the server does with one request: send ``reply``, then maybe close or hang."""

    reply: bytes | Callable[[bytes], bytes] = b""
    close: bool = False
    hang: bool = False
    # Bytes sent after ``reply`` in 1 MiB pieces, chunk-framed if ``reply`` declares chunked.
    stream: int = 0


@dataclass
class ScriptedServer:
    """A TLS server that runs one thread per connection and follows a script of steps."""

    context: ssl.SSLContext
    steps: list[Step]
    listener: socket.socket = field(default_factory=socket.socket)
    requests: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    connections: int = 0
    closed_by_client: list[int] = field(default_factory=list)
    closed_by_server: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def start(self) -> None:
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.released.set()
        self.listener.close()

    def wait_closed(self, number: int, *, by_server: bool = False) -> bool:
        """Wait up to five seconds for connection ``number`` to be closed by one side."""
        for _ in range(100):
            with self.lock:
                if number in (self.closed_by_server if by_server else self.closed_by_client):
                    return True
            self.released.wait(0.05)
        return False

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(raw, number), daemon=True).start()

    def _serve(self, raw: socket.socket, number: int) -> None:
        raw.settimeout(10)
        try:
            with self.context.wrap_socket(raw, server_side=True) as connection:
                buffer = b""
                while True:
                    request = _read_request(connection, buffer)
                    if request is None:
                        with self.lock:
                            self.closed_by_client.append(number)
                        return
                    head, body, buffer = request
                    with self.lock:
                        self.requests.append((number, head, body))
                        step = self.steps.pop(0) if self.steps else Step(close=True)
                    if not self._perform(connection, step, body):
                        break
        except OSError:
            return
        with self.lock:
            self.closed_by_server.append(number)

    def _perform(self, connection: ssl.SSLSocket, step: Step, body: bytes) -> bool:
        reply = step.reply(body) if callable(step.reply) else step.reply
        connection.sendall(reply)
        piece = b"x" * (1024 * 1024)
        chunked = b"chunked" in reply.lower()
        for _ in range(step.stream // len(piece)):
            connection.sendall(b"100000\r\n" + piece + b"\r\n" if chunked else piece)
        if step.hang:
            self.released.wait(30)
            return False
        return not step.close


def _read_request(
    connection: ssl.SSLSocket, buffer: bytes
) -> tuple[bytes, bytes, bytes] | None:
    while b"\r\n\r\n" not in buffer:
        data = connection.recv(65536)
        if not data:
            return None
        buffer += data
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < length:
        data = connection.recv(65536)
        if not data:
            return None
        buffer += data
    return head, buffer[:length], buffer[length:]


def response(
    body: bytes = b"{}", status: str = "200 OK", headers: tuple[str, ...] = ()
) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json", *headers]
    if not any(line.lower().startswith(("content-length", "transfer-encoding")) for line in lines):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ServerPki:
    return ensure_server_pki(tmp_path_factory.mktemp("transport") / "pki")[0]


@pytest.fixture
def serve(pki: ServerPki) -> Iterator[Callable[..., ScriptedServer]]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    servers: list[ScriptedServer] = []

    def start(*steps: Step) -> ScriptedServer:
        server = ScriptedServer(context, list(steps))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def client_for(server: ScriptedServer, pki: ServerPki, **options: object) -> CasClient:
    return CasClient(server.address, ca_pem=pki.ca_pem(), **options)  # type: ignore[arg-type]


def full_error(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


# -- framing ---------------------------------------------------------------------------------


def test_chunked_response_decoded(serve: Callable[..., ScriptedServer], pki: ServerPki) -> None:
    body = b'{"name": "a b", "hash": "00"}'
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"5;ext=1\r\n" + body[:5] + b"\r\n"
        + f"{len(body) - 5:x}\r\n".encode() + body[5:] + b"\r\n"
        + b"0\r\nTrailer-Field: yes\r\n\r\n"
    )
    server = serve(Step(chunked))
    with client_for(server, pki) as client:
        assert client.get_session("a b") == {"name": "a b", "hash": "00"}
    head = server.requests[0][1].decode()
    assert head.startswith("GET /v1/sessions/a%20b HTTP/1.1\r\n")
    assert f"Host: {server.address}" in head.split("\r\n")


def test_request_carries_body_and_type(
    serve: Callable[..., ScriptedServer], pki: ServerPki
) -> None:
    server = serve(Step(response(b'{"hash": "ab"}')))
    with client_for(server, pki) as client:
        assert client.create_session("name: x\n") == "ab"
    _, head, body = server.requests[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/sessions HTTP/1.1"
    assert "Content-Type: application/yaml" in lines
    assert "Content-Length: 8" in lines
    assert body == b"name: x\n"


def test_interim_response_skipped(serve: Callable[..., ScriptedServer], pki: ServerPki) -> None:
    server = serve(Step(b"HTTP/1.1 100 Continue\r\n\r\n" + response(b'{"values": {"a": 1}}')))
    with client_for(server, pki) as client:
        assert client.public_values("s") == {"a": 1}


def test_close_delimited_body_read(serve: Callable[..., ScriptedServer], pki: ServerPki) -> None:
    server = serve(Step(b'HTTP/1.1 200 OK\r\n\r\n{"values": {}}', close=True), Step(response()))
    with client_for(server, pki) as client:
        assert client.public_values("s") == {}
        client.get_session("s")
    # The end of a close-delimited body is the end of its connection.
    assert server.connections == 2


def test_rejection_reason_kept(serve: Callable[..., ScriptedServer], pki: ServerPki) -> None:
    server = serve(Step(response(b'{"error": "no access"}', "403 Forbidden")))
    with client_for(server, pki) as client, pytest.raises(CasRejected, match="no access") as caught:
        client.get_session("s")
    assert caught.value.status == 403


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "does not start with an HTTP/1.x status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "does not start with an HTTP/1.x status line"),
        (b"HTTP/1.1 101 Switching\r\n\r\n", "HTTP 101"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n1", "conflicting Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
         "invalid chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{}\r\n0\r\n\r\n",
         "longer than its size"),
        (b"HTTP/1.1 200 OK\r\n folded: line\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "malformed header line"),
    ],
)
def test_malformed_response_rejected(
    serve: Callable[..., ScriptedServer], pki: ServerPki, reply: bytes, message: str
) -> None:
    server = serve(Step(reply, close=True))
    with client_for(server, pki) as client, pytest.raises(CasError, match=message) as caught:
        client.get_session("s")
    assert "GET /v1/sessions/s" in str(caught.value)


# -- limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "stream"),
    [
        (f"HTTP/1.1 200 OK\r\nContent-Length: {LIMIT + 1}\r\n\r\n".encode(), 0),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", LIMIT + 2**20),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", LIMIT + 2**20),
    ],
    ids=["content-length", "chunked", "close-delimited"],
)
def test_oversized_body_rejected(
    serve: Callable[..., ScriptedServer], pki: ServerPki, reply: bytes, stream: int
) -> None:
    server = serve(Step(reply, close=True, stream=stream))
    with client_for(server, pki) as client, pytest.raises(CasError) as caught:
        client.get_session("s")
    assert f"larger than the limit of {LIMIT} bytes" in str(caught.value)
    assert "GET /v1/sessions/s" in str(caught.value)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (("X-Long: " + "a" * 9000,), "header line is longer than 8192 bytes"),
        (tuple(f"X-{n}: 1" for n in range(101)), "more than 100 header fields"),
        (tuple(f"X-{n}: " + "a" * 4000 for n in range(20)), "headers are longer than 65536"),
    ],
    ids=["long-line", "many-fields", "large-head"],
)
def test_oversized_headers_rejected(
    serve: Callable[..., ScriptedServer], pki: ServerPki, headers: tuple[str, ...], message: str
) -> None:
    server = serve(Step(response(headers=headers), close=True))
    with client_for(server, pki) as client, pytest.raises(CasError, match=message):
        client.get_session("s")


def test_endless_status_line_rejected(
    serve: Callable[..., ScriptedServer], pki: ServerPki
) -> None:
    server = serve(Step(b"HTTP/1.1 200 ", close=True, stream=2**20))
    with client_for(server, pki) as client, pytest.raises(CasError, match="status line is longer"):
        client.get_session("s")


# -- broken connections ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
         "closed the connection after 10 of 100 bytes of the response body"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123",
         "closed the connection after 4 of 16 bytes of the chunk"),
        (b"HTTP/1.1 200 OK\r\nContent-Len", "closed the connection within the header line"),
        (b"", "closed the connection without a response"),
    ],
    ids=["body", "chunk", "headers", "nothing"],
)
def test_close_mid_response_fails_once(
    serve: Callable[..., ScriptedServer], pki: ServerPki, reply: bytes, message: str
) -> None:
    server = serve(Step(reply, close=True), Step(response()))
    with client_for(server, pki, attempts=3) as client, pytest.raises(CasError, match=message):
        client.get_session("s")
    # The request reached the CAS, so it is not sent again.
    assert len(server.requests) == 1


def test_silent_server_times_out(serve: Callable[..., ScriptedServer], pki: ServerPki) -> None:
    server = serve(Step(hang=True))
    with client_for(server, pki, timeout=0.5) as client, pytest.raises(CasError, match="timed out"):
        client.create_session("name: x\n")
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "reply",
    [
        response(b'{"hash": "' + RESPONSE_SECRET + b'"', headers=("Content-Length: 99",)),
        response(b'{"secret": "' + RESPONSE_SECRET + b'\xff"}'),
        response(b"[" + RESPONSE_SECRET + b"]"),
        response(b'["' + RESPONSE_SECRET + b'"]'),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n" + RESPONSE_SECRET,
        b"HTTP/1.1 200 OK\r\nContent-Length: " + RESPONSE_SECRET + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + RESPONSE_SECRET + b"\r\n",
        RESPONSE_SECRET + b"\r\n\r\n",
    ],
    ids=["truncated", "bad-utf8", "bad-json", "not-object", "bad-chunk-end",
         "bad-content-length", "bad-chunk-size", "bad-status-line"],
)
def test_error_omits_bodies(
    serve: Callable[..., ScriptedServer], pki: ServerPki, reply: bytes
) -> None:
    server = serve(Step(reply, close=True))
    with client_for(server, pki) as client, pytest.raises(CasError) as caught:
        client.create_session(f"password: {REQUEST_SECRET}\n")
    text = full_error(caught.value)
    assert "POST /v1/sessions" in str(caught.value)
    assert REQUEST_SECRET not in text
    assert RESPONSE_SECRET.decode() not in text
    assert RESPONSE_SECRET[:12].decode() not in text


# -- connection reuse ------------------------------------------------------------------------


def test_keep_alive_uses_one_handshake(
    serve: Callable[..., ScriptedServer], pki: ServerPki
) -> None:
    server = serve(Step(response(b'{"values": {}}')), Step(response(b'{"hash": "ab"}')))
    with client_for(server, pki) as client:
        assert client.public_values("s") == {}
        assert client.create_session("name: x\n") == "ab"
    assert server.connections == 1
    assert [number for number, _, _ in server.requests] == [1, 1]
    assert server.wait_closed(1), "the client did not close its connection"


def test_connection_close_honoured(serve: Callable[..., ScriptedServer], pki: ServerPki) -> None:
    server = serve(Step(response(headers=("Connection: close",))), Step(response()))
    with client_for(server, pki) as client:
        client.get_session("s")
        client.get_session("s")
    assert server.connections == 2


def test_double_framing_not_reused(serve: Callable[..., ScriptedServer], pki: ServerPki) -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = serve(Step(reply + b"2\r\n{}\r\n0\r\n\r\n"), Step(response()))
    with client_for(server, pki) as client:
        client.get_session("s")
        client.get_session("s")
    assert server.connections == 2


def test_old_idle_connection_replaced(
    serve: Callable[..., ScriptedServer], pki: ServerPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "_MAX_IDLE", 0.0)
    server = serve(Step(response()), Step(response()))
    with client_for(server, pki) as client:
        client.get_session("s")
        client.get_session("s")
    assert server.connections == 2
    assert server.wait_closed(1), "the client did not close the old connection"


def test_idle_closed_by_server_replaced(
    serve: Callable[..., ScriptedServer], pki: ServerPki
) -> None:
    # The server closes right after its response, without saying so in a header.
    server = serve(Step(response(), close=True), Step(response(b'{"hash": "ab"}')))
    with client_for(server, pki) as client:
        client.get_session("s")
        assert server.wait_closed(1, by_server=True)
        assert client.create_session("name: x\n") == "ab"
    assert server.connections == 2
    assert len(server.requests) == 2


def test_stale_reused_get_sent_again(serve: Callable[..., ScriptedServer], pki: ServerPki) -> None:
    # The second request finds the reused connection closed before any response byte.
    server = serve(Step(response()), Step(close=True), Step(response(b'{"values": {"a": 1}}')))
    with client_for(server, pki) as client:
        client.get_session("s")
        assert client.public_values("s") == {"a": 1}
    assert [number for number, _, _ in server.requests] == [1, 1, 2]


def test_stale_reused_post_not_sent_again(
    serve: Callable[..., ScriptedServer], pki: ServerPki
) -> None:
    server = serve(Step(response()), Step(close=True), Step(response(b'{"hash": "ab"}')))
    with client_for(server, pki) as client:
        client.get_session("s")
        with pytest.raises(CasError, match="closed the connection without a response"):
            client.create_session("name: x\n")
    # Creating a session is not idempotent: the CAS may have stored it before closing.
    assert len(server.requests) == 2
    assert server.connections == 1


def test_stale_fresh_get_not_sent_again(
    serve: Callable[..., ScriptedServer], pki: ServerPki
) -> None:
    server = serve(Step(close=True), Step(response()))
    with client_for(server, pki) as client, pytest.raises(CasError, match="without a response"):
        client.get_session("s")
    assert len(server.requests) == 1


def _attest_reply(body: bytes) -> bytes:
    request = json.loads(body)
    cas_private, cas_public = crypto.x25519_generate()
    key = crypto.hkdf_sha256(
        crypto.x25519_exchange(cas_private, bytes.fromhex(request["public_key"])),
        salt=bytes.fromhex(request["nonce"]),
        info=CONFIG_INFO,
    )
    nonce = bytes(12)
    sealed = crypto.aes_gcm_encrypt(key, nonce, b'{"env": {"A": "1"}}', b"")
    answer = {
        "cas_public_key": cas_public.hex(),
        "nonce": nonce.hex(),
        "ciphertext": base64.b64encode(sealed).decode("ascii"),
    }
    return response(json.dumps(answer).encode())


def test_attestation_uses_one_connection(
    serve: Callable[..., ScriptedServer], pki: ServerPki
) -> None:
    challenge = response(json.dumps({"nonce": "ab" * 32}).encode())
    server = serve(Step(challenge), Step(_attest_reply))
    client = client_for(server, pki)
    evidence: list[bytes] = []

    def produce(report_data: bytes) -> tuple[str, bytes]:
        evidence.append(report_data)
        return "simulated", b"evidence"

    assert client.request_configuration("app/api", produce) == {"env": {"A": "1"}}
    assert len(evidence) == 1
    assert [head.split(b" ")[1] for _, head, _ in server.requests] == [
        b"/v1/attest/challenge", b"/v1/attest"
    ]
    assert server.connections == 1
    assert server.wait_closed(1), "request_configuration left its connection open"


def test_certificate_must_name_the_host(tmp_path: Path) -> None:
    # The client trusts this certificate as its CA, but it names another host.
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = self_signed_certificate(
        key,
        "other.example",
        now=datetime.datetime.now(datetime.UTC),
        valid_for=datetime.timedelta(days=1),
        extensions=[
            (x509.SubjectAlternativeName([x509.DNSName("other.example")]), False),
            (x509.BasicConstraints(ca=True, path_length=None), True),
        ],
    )
    certificate_pem = certificate.public_bytes(Encoding.PEM)
    (tmp_path / "server.pem").write_bytes(certificate_pem + private_key_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem")
    server = ScriptedServer(context, [Step(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")])
    server.start()
    try:
        client = CasClient(server.address, ca_pem=certificate_pem, attempts=1)

        with pytest.raises(CasError, match=r"failed certificate verification.*mismatch"):
            client.challenge()
    finally:
        server.stop()


def test_pin_fetch_connection_not_reused(
    serve: Callable[..., ScriptedServer], pki: ServerPki
) -> None:
    # The CA certificate is fetched without verification, so that connection must not carry
    # the verified requests that follow.
    server = serve(Step(response(pki.ca_pem())), Step(response()), Step(response()))
    fingerprint = pki.fingerprint()
    with CasClient(server.address, fingerprint=fingerprint) as client:
        client.get_session("s")
        client.get_session("s")
    assert [number for number, _, _ in server.requests] == [1, 2, 2]
    assert server.wait_closed(1)


def test_threads_share_a_client(serve: Callable[..., ScriptedServer], pki: ServerPki) -> None:
    server = serve(*[Step(response(b'{"values": {}}')) for _ in range(40)])
    results: list[dict[str, object]] = []

    def work() -> None:
        for _ in range(10):
            results.append(client.public_values("s"))

    with client_for(server, pki) as client:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == [{}] * 40
    assert len(server.requests) == 40


# -- helpers without a server ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["plain", "a b/c", "100%", "~user_.-", "ünïcode", "a?b#c&d=e", "\x00\x7f", "🔑"]
)
def test_quote_matches_urllib(name: str) -> None:
    assert _quote(name) == urllib.parse.quote(name, safe="/")


def test_quote_rejects_surrogates() -> None:
    with pytest.raises(UnicodeEncodeError):
        _quote("\udc80")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("https://user@CAS.Example:8443/path?q#f", ("cas.example", 8443)),
        ("HTTPS://cas.example", ("cas.example", 8081)),
        ("https://[::1]:9000/", ("::1", 9000)),
    ],
)
def test_url_address_forms(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["https://cas.example:abc", "https://:80", "https://"])
def test_invalid_url_address_rejected(address: str) -> None:
    with pytest.raises(CasError, match="invalid CAS address"):
        parse_address(address)


def test_import_avoids_http_client() -> None:
    # The launcher imports the client in every confidential start, and http.client would bring
    # the email package, urllib and datetime along.
    probe = (
        "import sys, enclavify.cas.client\n"
        "print(sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('http', 'email', 'urllib', 'datetime')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True,
        cwd=Path(__file__).parent,
    )
    assert result.stdout.strip() == "[]"
