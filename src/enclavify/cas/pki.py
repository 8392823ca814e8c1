"""The CAS's own certificates and the TLS context it serves with.

On first start the CAS makes a CA (an EC P-256 key and a self-signed certificate) and a server
certificate issued by it. Clients pin the CA certificate, by PEM or by its fingerprint (the hex
SHA-256 of its DER encoding). Clients identify themselves with self-signed certificates; the
CAS accepts any such certificate, because the TLS handshake already proves possession of its
private key, and names the client by the SHA-256 of its SubjectPublicKeyInfo.
"""

from __future__ import annotations

import ctypes
import datetime
import fcntl
import hashlib
import ipaddress
import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enclavify import atomic
from enclavify.cas.client import pem_fingerprint
from enclavify.cas.paths import CA_CERT
from enclavify.errors import CasError
from enclavify.secrets.certificates import CLOCK_SKEW, private_key_pem, self_signed_certificate

log = logging.getLogger(__name__)

CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
_PKI_LOCK = ".pki.lock"
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")

_CA_VALIDITY = datetime.timedelta(days=3650)
_SERVER_VALIDITY = datetime.timedelta(days=825)


@dataclass(frozen=True)
class ServerPki:
    """Paths of the CA certificate and the server's certificate and key in a data directory."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def ca_pem(self) -> bytes:
        return self.ca_cert.read_bytes()

    def fingerprint(self) -> str:
        return pem_fingerprint(self.ca_pem())


def client_key_hash(certificate_der: bytes) -> str:
    """Return the hex SHA-256 of the SubjectPublicKeyInfo of a DER certificate."""
    certificate = x509.load_der_x509_certificate(certificate_der)
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def ensure_server_pki(
    data_dir: Path, extra_sans: Sequence[str] = (), *, now: datetime.datetime | None = None
) -> tuple[ServerPki, bool]:
    """Load the CA and server certificate from ``data_dir``, making them on first use.

    The server certificate is made again, under the existing CA, when ``extra_sans`` names a
    subject alternative name it lacks, so ``--san`` can be added later without changing the
    fingerprint clients pin. Returns the paths and whether the CA was created now.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # CAS processes sharing a data directory may start together. Unserialized, each would
    # make its own CA and the later writes would pair one process's key with another's
    # certificate.
    with open(data_dir / _PKI_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_server_pki_locked(data_dir, extra_sans, now)


def _ensure_server_pki_locked(
    data_dir: Path, extra_sans: Sequence[str], now: datetime.datetime
) -> tuple[ServerPki, bool]:
    pki = ServerPki(data_dir / CA_CERT, data_dir / SERVER_CERT, data_dir / SERVER_KEY)
    ca_key_path = data_dir / CA_KEY
    created = False

    if not pki.ca_cert.exists() or not ca_key_path.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_usage = x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False,
        )
        ca_cert = self_signed_certificate(
            ca_key, "enclavify CAS CA", now=now, valid_for=_CA_VALIDITY,
            extensions=[
                (x509.BasicConstraints(ca=True, path_length=0), True),
                (ca_usage, True),
                (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
            ],
        )
        atomic.write_bytes(ca_key_path, private_key_pem(ca_key), mode=0o600)
        atomic.write_bytes(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        pki.server_cert.unlink(missing_ok=True)
        created = True
        log.debug("created CAS CA in %s", data_dir)

    wanted = list(DEFAULT_SANS) + list(extra_sans)
    if _server_cert_needs_renewal(pki, wanted, now):
        ca_key_loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        if not isinstance(ca_key_loaded, ec.EllipticCurvePrivateKey):
            raise CasError(f"{ca_key_path}: expected an EC private key")
        ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, wanted[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + _SERVER_VALIDITY)
            .add_extension(x509.SubjectAlternativeName(_san_entries(wanted)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key_loaded.public_key()),
                critical=False,
            )
            .sign(ca_key_loaded, hashes.SHA256())
        )
        atomic.write_bytes(pki.server_key, private_key_pem(server_key), mode=0o600)
        chain = server_cert.public_bytes(serialization.Encoding.PEM)
        atomic.write_bytes(pki.server_cert, chain, mode=0o600)
        log.debug("issued CAS server certificate for %s", ", ".join(wanted))
    return pki, created


def _server_cert_needs_renewal(
    pki: ServerPki, wanted: Sequence[str], now: datetime.datetime
) -> bool:
    if not pki.server_cert.exists() or not pki.server_key.exists():
        return True
    certificate = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    if certificate.not_valid_after_utc < now + datetime.timedelta(days=30):
        return True
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    present = {str(entry.value) for entry in san}
    return not set(_normalise(name) for name in wanted) <= present


def _normalise(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def server_ssl_context(pki: ServerPki) -> ssl.SSLContext:
    """Return a TLS server context that requests, but does not require, a client certificate.

    Any client certificate is accepted whatever its issuer: the handshake's CertificateVerify
    message still proves the client holds the matching private key, and the CAS identifies the
    client by its public key alone (see :func:`client_key_hash`).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_OPTIONAL
    _accept_any_client_certificate(context)
    return context


# The standard library's ssl module has no verify callback, so the CAS installs one through
# libssl: a callback that accepts every chain. Keep a reference so it is never collected.
_VERIFY_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
_ACCEPT_ANY = _VERIFY_CALLBACK_TYPE(lambda preverify_ok, store_context: 1)
_SSL_VERIFY_PEER = 1


def _accept_any_client_certificate(context: ssl.SSLContext) -> None:
    libssl = _loaded_libssl()
    # CPython's SSLContext object starts with PyObject_HEAD followed by its SSL_CTX pointer.
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    libssl.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    libssl.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    if pointer is None or libssl.SSL_CTX_get_verify_mode(pointer) != _SSL_VERIFY_PEER:
        raise CasError("cannot install the client certificate callback on this Python build")
    libssl.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    libssl.SSL_CTX_set_verify.restype = None
    libssl.SSL_CTX_set_verify(
        pointer, _SSL_VERIFY_PEER, ctypes.cast(_ACCEPT_ANY, ctypes.c_void_p)
    )


def _loaded_libssl() -> ctypes.CDLL:
    """Return the libssl the ssl module is linked against (already mapped into this process)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError as error:
        raise CasError(f"cannot find the loaded libssl: {error}") from error
    for line in maps.splitlines():
        fields = line.split()
        if fields and re.search(r"/libssl\.so(\.[0-9.]+)?$", fields[-1]):
            return ctypes.CDLL(fields[-1])
    raise CasError("the ssl module's libssl is not mapped into this process")
