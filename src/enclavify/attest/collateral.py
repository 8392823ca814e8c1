"""Collateral: what a verifier needs besides the evidence to decide whether it is genuine.

For SGX and TDX quotes that is Intel's PCS material in the JSON form dcap-qvl reads (PCK
certificate chain and CRLs, TCB info, QE identity, each with its signing chain). For SEV-SNP it
is the VCEK or VLEK certificate with AMD's ASK and ARK and, optionally, AMD's CRL. Collateral is
loaded from files here; :mod:`enclavify.attest.pccs` fetches and caches it from a caching
service. Nothing in this module touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from enclavify.errors import AttestationError

# Keys of dcap-qvl's QuoteCollateralV3 JSON; all must be present for a quote to be verified.
DCAP_KEYS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_CRL = b"-----BEGIN X509 CRL-----"


@dataclass(frozen=True)
class Collateral:
    """Verification material for one piece of evidence.

    ``dcap`` is dcap-qvl's collateral JSON object for SGX and TDX quotes. ``certificates`` and
    ``crls`` are DER or PEM blobs for SEV-SNP: a VCEK or VLEK and, when the package's own AMD
    roots are not to be used, the ASK and ARK; the verifier sorts them by subject.
    """

    dcap: Mapping[str, Any] | None = None
    certificates: tuple[bytes, ...] = ()
    crls: tuple[bytes, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dcap_json(cls, data: bytes | str) -> Collateral:
        """Parse dcap-qvl's collateral JSON.

        Raises:
            AttestationError: if it is not a JSON object with every collateral field.
        """
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise AttestationError(f"collateral is not valid JSON: {error}") from error
        if not isinstance(value, dict):
            raise AttestationError("collateral JSON must be an object")
        missing = [key for key in DCAP_KEYS if key not in value]
        if missing:
            raise AttestationError(f"collateral JSON lacks {', '.join(missing)}")
        return cls(dcap=value)

    @classmethod
    def from_pem_or_der(cls, blobs: Sequence[bytes]) -> Collateral:
        """Collect certificates and CRLs from PEM bundles or single DER files."""
        certificates: list[bytes] = []
        crls: list[bytes] = []
        for blob in blobs:
            if _PEM_CERTIFICATE in blob or _PEM_CRL in blob:
                certificates.extend(_pem_blocks(blob, "CERTIFICATE"))
                crls.extend(_pem_blocks(blob, "X509 CRL"))
            elif _looks_like_der_crl(blob):
                crls.append(blob)
            else:
                certificates.append(blob)
        return cls(certificates=tuple(certificates), crls=tuple(crls))

    @classmethod
    def load(cls, paths: Sequence[Path]) -> Collateral:
        """Load collateral from files: one dcap-qvl JSON file, or certificate and CRL files.

        Raises:
            AttestationError: if a file cannot be read or a JSON file is not valid collateral.
        """
        blobs: list[bytes] = []
        for path in paths:
            try:
                blobs.append(path.read_bytes())
            except OSError as error:
                raise AttestationError(f"cannot read collateral {str(path)!r}: {error}") from error
        if len(blobs) == 1 and blobs[0].lstrip().startswith(b"{"):
            return cls.from_dcap_json(blobs[0])
        if any(blob.lstrip().startswith(b"{") for blob in blobs):
            raise AttestationError("a dcap collateral JSON file must be given alone")
        return cls.from_pem_or_der(blobs)


def _pem_blocks(blob: bytes, label: str) -> list[bytes]:
    """Return the PEM blocks of ``label`` in ``blob``, each re-encoded as its own PEM text."""
    begin = f"-----BEGIN {label}-----".encode()
    end = f"-----END {label}-----".encode()
    blocks = []
    start = blob.find(begin)
    while start != -1:
        stop = blob.find(end, start)
        if stop == -1:
            raise AttestationError(f"unterminated PEM {label} block in collateral")
        blocks.append(blob[start : stop + len(end)] + b"\n")
        start = blob.find(begin, stop)
    return blocks


def _looks_like_der_crl(blob: bytes) -> bool:
    """Return whether ``blob`` parses as a DER CRL (otherwise it is taken as a certificate)."""
    try:
        x509.load_der_x509_crl(blob)
    except ValueError:
        return False
    return True
