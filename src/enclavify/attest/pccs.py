"""DCAP collateral from a caching service that speaks Intel's PCCS API (version 4).

Only the configured address is contacted: PCK CRL and root CA CRL from ``/sgx/...``, TCB info
and QE identity from ``/sgx/...`` or ``/tdx/...``. The responses are assembled into dcap-qvl's
collateral JSON and kept in memory, keyed by TEE type, FMSPC and PCK CA, until the earliest
``nextUpdate`` of the TCB info, the QE identity and the two CRLs. The signatures are not checked
here; dcap-qvl checks all of them against Intel's root when the quote is verified.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http.client import HTTPMessage
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclavify.attest.collateral import Collateral
from enclavify.attest.dcap import TEE_TYPE_TDX, quote_header
from enclavify.errors import AttestationError

log = logging.getLogger(__name__)

# Fetch(url) -> (body, headers with lower-case names); injectable for tests and other transports.
Fetch = Callable[[str], tuple[bytes, dict[str, str]]]

# Collateral documents are kilobytes (CRLs, TCB info, QE identity); a larger response is
# rejected before it is read whole into memory.
MAX_RESPONSE = 4 * 1024 * 1024


@dataclass(frozen=True)
class _Entry:
    collateral: Collateral
    valid_until: datetime


class CollateralService:
    """Fetches and caches DCAP collateral from one PCCS-style address."""

    def __init__(
        self,
        address: str,
        *,
        ca_file: str | None = None,
        timeout: float = 10.0,
        fetch: Fetch | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(address)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"collateral service address {address!r} is not an http(s) URL")
        self.address = address.rstrip("/")
        self._context = ssl.create_default_context(cafile=ca_file)
        self._timeout = timeout
        self._fetch = fetch or self._urlopen
        self._cache: dict[tuple[str, str, str], _Entry] = {}
        self._lock = threading.Lock()

    def collateral_for(self, quote: bytes, *, now: datetime) -> Collateral:
        """Return collateral for ``quote``, from the cache while it is valid at ``now``.

        Raises:
            AttestationError: the quote cannot be parsed, or the service is unreachable or
                returns something that is not collateral.
        """
        tee, fmspc, ca = _quote_identity(quote)
        key = (tee, fmspc, ca)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and now < entry.valid_until:
                return entry.collateral
            log.debug(
                "fetching %s collateral for FMSPC %s (%s CA) from %s", tee, fmspc, ca, self.address
            )
            entry = self._download(tee, fmspc, ca)
            if now >= entry.valid_until:
                raise AttestationError(
                    f"collateral from {self.address} expired at {entry.valid_until.isoformat()}"
                )
            self._cache[key] = entry
            return entry.collateral

    def _download(self, tee: str, fmspc: str, ca: str) -> _Entry:
        sgx = f"{self.address}/sgx/certification/v4"
        tee_base = f"{self.address}/{tee}/certification/v4"

        pck_crl, headers = self._get(f"{sgx}/pckcrl?ca={ca}&encoding=der")
        pck_crl_chain = _header(headers, "sgx-pck-crl-issuer-chain")
        root_crl, _ = self._get(f"{sgx}/rootcacrl")

        tcb_body, headers = self._get(f"{tee_base}/tcb?fmspc={fmspc}")
        tcb_chain = _header(headers, "tcb-info-issuer-chain", "sgx-tcb-info-issuer-chain")
        tcb_info, tcb_signature = _signed_member(tcb_body, "tcbInfo")

        qe_body, headers = self._get(f"{tee_base}/qe/identity")
        qe_chain = _header(headers, "sgx-enclave-identity-issuer-chain")
        qe_identity, qe_signature = _signed_member(qe_body, "enclaveIdentity")

        pck_crl_der = _crl_der(pck_crl, "PCK CRL")
        root_crl_der = _crl_der(root_crl, "root CA CRL")
        document = {
            "pck_crl_issuer_chain": pck_crl_chain,
            "root_ca_crl": root_crl_der.hex(),
            "pck_crl": pck_crl_der.hex(),
            "tcb_info_issuer_chain": tcb_chain,
            "tcb_info": tcb_info,
            "tcb_info_signature": tcb_signature,
            "qe_identity_issuer_chain": qe_chain,
            "qe_identity": qe_identity,
            "qe_identity_signature": qe_signature,
        }
        valid_until = min(
            _next_update(tcb_info, "TCB info"),
            _next_update(qe_identity, "QE identity"),
            _crl_next_update(pck_crl_der, "PCK CRL"),
            _crl_next_update(root_crl_der, "root CA CRL"),
        )
        return _Entry(Collateral(dcap=document), valid_until)

    def _get(self, url: str) -> tuple[bytes, dict[str, str]]:
        try:
            return self._fetch(url)
        except (OSError, urllib.error.URLError) as error:
            raise AttestationError(f"collateral service request {url} failed: {error}") from error

    def _urlopen(self, url: str) -> tuple[bytes, dict[str, str]]:
        request = urllib.request.Request(url, headers={"Accept": "*/*"})  # noqa: S310 -- http(s) only, checked in __init__
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self._context), _RedirectRejected()
        )
        with opener.open(request, timeout=self._timeout) as response:
            headers = {name.lower(): value for name, value in response.headers.items()}
            body: bytes = response.read(MAX_RESPONSE + 1)
        if len(body) > MAX_RESPONSE:
            raise AttestationError(
                f"collateral service response to {url} exceeds {MAX_RESPONSE} bytes"
            )
        return body, headers


class _RedirectRejected(urllib.request.HTTPRedirectHandler):
    """Turns a redirect into an error, so that only the configured address is contacted."""

    def redirect_request(  # noqa: PLR0917 - urllib calls it with these positional arguments
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        raise urllib.error.HTTPError(
            req.full_url, code, f"redirect to {newurl!r} rejected", headers, fp
        )


def _quote_identity(quote: bytes) -> tuple[str, str, str]:
    _version, tee_type = quote_header(quote)
    try:
        import dcap_qvl  # noqa: PLC0415 -- optional: only SGX and TDX need it
    except ImportError as error:
        raise AttestationError("fetching DCAP collateral needs the dcap-qvl package") from error
    try:
        parsed = dcap_qvl.parse_quote(quote)
        fmspc, ca = parsed.fmspc(), parsed.ca()
    except ValueError as error:
        raise AttestationError(f"cannot read FMSPC and PCK CA from the quote: {error}") from error
    return ("tdx" if tee_type == TEE_TYPE_TDX else "sgx"), str(fmspc), str(ca)


def _header(headers: dict[str, str], *names: str) -> str:
    for name in names:
        if name in headers:
            return urllib.parse.unquote(headers[name])
    raise AttestationError(f"collateral service response lacks the {names[0]} header")


def _signed_member(body: bytes, member: str) -> tuple[str, str]:
    """Return the exact text of ``member`` (as signed) and the hex signature from a PCCS response.

    The signature covers the member's bytes as the service sent them, so the text is cut out
    of the body rather than re-serialised.
    """
    try:
        text = body.decode("utf-8")
        document = json.loads(text)
    except (UnicodeDecodeError, ValueError) as error:
        raise AttestationError(f"collateral service {member} response is not JSON") from error
    signature = document.get("signature") if isinstance(document, dict) else None
    marker = text.find(f'"{member}"')
    if not isinstance(signature, str) or marker == -1:
        raise AttestationError(f"collateral service response lacks {member} or its signature")
    start = text.index(":", marker) + 1
    while text[start].isspace():
        start += 1
    _value, end = json.JSONDecoder().raw_decode(text, start)
    return text[start:end], signature


def _crl_der(body: bytes, name: str) -> bytes:
    stripped = body.strip()
    if stripped.startswith(b"-----BEGIN"):
        try:
            return x509.load_pem_x509_crl(stripped).public_bytes(Encoding.DER)
        except ValueError as error:
            raise AttestationError(f"collateral service {name} is not a CRL") from error
    try:
        # Intel's PCCS returns the root CA CRL as hex text.
        return bytes.fromhex(stripped.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        pass
    try:
        x509.load_der_x509_crl(body)
    except ValueError as error:
        raise AttestationError(f"collateral service {name} is not a CRL") from error
    return body


def _crl_next_update(der: bytes, name: str) -> datetime:
    crl = x509.load_der_x509_crl(der)
    if crl.next_update_utc is None:
        raise AttestationError(f"collateral service {name} has no next update time")
    return crl.next_update_utc


def _next_update(text: str, name: str) -> datetime:
    try:
        value = json.loads(text)["nextUpdate"]
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError) as error:
        raise AttestationError(f"collateral service {name} has no valid nextUpdate") from error
