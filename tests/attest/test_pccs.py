"""DCAP collateral fetched from a PCCS-style service on 127.0.0.1 and cached in memory."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from enclavify.attest.pccs import MAX_RESPONSE, CollateralService
from enclavify.attest.verify import verify_evidence
from enclavify.cli import main
from enclavify.errors import AttestationError

from .samples import sample

pytest.importorskip("dcap_qvl", reason="DCAP collateral lookup needs the dcap-qvl package")

INSIDE = datetime(2025, 7, 1, tzinfo=UTC)


class FakePccs:
    """Serves the samples' collateral in the shape of Intel's PCCS version 4 API."""

    def __init__(
        self, collaterals: dict[str, dict[str, str]], *, omit_header: str | None = None
    ) -> None:
        self.collaterals = collaterals  # by tee: "sgx" or "tdx"
        self.omit_header = omit_header
        self.redirect_to: str | None = None
        self.oversize = False
        self.requests: list[str] = []

    def answer(self, path: str) -> tuple[bytes, dict[str, str]]:
        url = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(url.query)
        tee = url.path.split("/")[1]
        if url.path == "/sgx/certification/v4/pckcrl":
            document = self._by_ca(query["ca"][0])
            return bytes.fromhex(document["pck_crl"]), {
                "SGX-PCK-CRL-Issuer-Chain": urllib.parse.quote(document["pck_crl_issuer_chain"])
            }
        if url.path == "/sgx/certification/v4/rootcacrl":
            if self.oversize:
                return b"0" * (MAX_RESPONSE + 1), {}
            return next(iter(self.collaterals.values()))["root_ca_crl"].encode(), {}
        document = self.collaterals[tee]
        if url.path.endswith("/tcb"):
            assert query["fmspc"][0] == json.loads(document["tcb_info"])["fmspc"]
            info, signature = document["tcb_info"], document["tcb_info_signature"]
            body = f'{{"tcbInfo":{info},"signature":"{signature}"}}'
            chain = urllib.parse.quote(document["tcb_info_issuer_chain"])
            return body.encode(), {"TCB-Info-Issuer-Chain": chain}
        if url.path.endswith("/qe/identity"):
            identity, signature = document["qe_identity"], document["qe_identity_signature"]
            body = f'{{"enclaveIdentity": {identity}, "signature": "{signature}"}}'
            chain = urllib.parse.quote(document["qe_identity_issuer_chain"])
            return body.encode(), {"SGX-Enclave-Identity-Issuer-Chain": chain}
        raise KeyError(path)

    def _by_ca(self, ca: str) -> dict[str, str]:
        return self.collaterals["sgx" if ca == "processor" else "tdx"]


@pytest.fixture
def pccs() -> Iterator[tuple[FakePccs, str]]:
    collaterals = {
        "sgx": json.loads(sample("dcap-qvl/sgx_quote_collateral.json").read_text()),
        "tdx": json.loads(sample("dcap-qvl/tdx_quote_collateral.json").read_text()),
    }
    fake = FakePccs(collaterals)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fake.requests.append(self.path)
            if fake.redirect_to is not None:
                self.send_response(302)
                self.send_header("Location", fake.redirect_to + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            try:
                body, headers = fake.answer(self.path)
            except KeyError:
                self.send_error(404)
                return
            self.send_response(200)
            for name, value in headers.items():
                if name != fake.omit_header:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_sgx_collateral_fetched_and_verifies(pccs: tuple[FakePccs, str]) -> None:
    fake, address = pccs
    quote = sample("dcap-qvl/sgx_quote").read_bytes()
    collateral = CollateralService(address).collateral_for(quote, now=INSIDE)
    claims = verify_evidence("sgx-dcap", quote, now=INSIDE, collateral=collateral)
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert sorted(request.split("?")[0] for request in fake.requests) == [
        "/sgx/certification/v4/pckcrl",
        "/sgx/certification/v4/qe/identity",
        "/sgx/certification/v4/rootcacrl",
        "/sgx/certification/v4/tcb",
    ]


def test_tdx_collateral_uses_tdx_paths(pccs: tuple[FakePccs, str]) -> None:
    fake, address = pccs
    quote = sample("dcap-qvl/tdx_quote").read_bytes()
    collateral = CollateralService(address).collateral_for(quote, now=INSIDE)
    claims = verify_evidence("tdx", quote, now=INSIDE, collateral=collateral)
    assert claims.tcb_status == "UpToDate"
    assert "/tdx/certification/v4/tcb?fmspc=B0C06F000000" in fake.requests
    assert "/sgx/certification/v4/pckcrl?ca=platform&encoding=der" in fake.requests


def test_cached_collateral_is_reused_while_valid(pccs: tuple[FakePccs, str]) -> None:
    fake, address = pccs
    quote = sample("dcap-qvl/sgx_quote").read_bytes()
    service = CollateralService(address)
    first = service.collateral_for(quote, now=INSIDE)
    second = service.collateral_for(quote, now=datetime(2025, 7, 10, tzinfo=UTC))
    assert second is first
    assert len(fake.requests) == 4


def test_stale_collateral_is_refetched_then_rejected(pccs: tuple[FakePccs, str]) -> None:
    fake, address = pccs
    quote = sample("dcap-qvl/sgx_quote").read_bytes()
    service = CollateralService(address)
    service.collateral_for(quote, now=INSIDE)
    # The fake service still serves the same collateral, which has expired by then.
    with pytest.raises(AttestationError, match="expired at 2025-07-19"):
        service.collateral_for(quote, now=datetime(2025, 8, 1, tzinfo=UTC))
    assert len(fake.requests) == 8


def test_missing_issuer_chain_is_rejected(pccs: tuple[FakePccs, str]) -> None:
    fake, address = pccs
    fake.omit_header = "TCB-Info-Issuer-Chain"
    quote = sample("dcap-qvl/sgx_quote").read_bytes()
    with pytest.raises(AttestationError, match="response lacks the tcb-info-issuer-chain header"):
        CollateralService(address).collateral_for(quote, now=INSIDE)


def test_redirect_is_not_followed(pccs: tuple[FakePccs, str]) -> None:
    fake, address = pccs
    # Followed, the redirect would reach the same fake again under another host name.
    fake.redirect_to = address.replace("127.0.0.1", "localhost")
    quote = sample("dcap-qvl/sgx_quote").read_bytes()
    with pytest.raises(AttestationError, match=r"HTTP Error 302: redirect to .* rejected"):
        CollateralService(address).collateral_for(quote, now=INSIDE)
    assert len(fake.requests) == 1


def test_oversized_response_is_rejected(pccs: tuple[FakePccs, str]) -> None:
    fake, address = pccs
    fake.oversize = True
    quote = sample("dcap-qvl/sgx_quote").read_bytes()
    with pytest.raises(AttestationError, match=f"exceeds {MAX_RESPONSE} bytes"):
        CollateralService(address).collateral_for(quote, now=INSIDE)


def test_unreachable_service_is_reported() -> None:
    quote = sample("dcap-qvl/sgx_quote").read_bytes()
    # Port 9 on loopback (discard) has no listener here, so the connection is refused.
    service = CollateralService("http://127.0.0.1:9", timeout=2)
    with pytest.raises(AttestationError, match=r"collateral service request .* failed"):
        service.collateral_for(quote, now=INSIDE)


def test_address_must_be_http_url() -> None:
    with pytest.raises(ValueError, match="not an http"):
        CollateralService("file:///etc/passwd")


def test_cli_fetches_from_pccs(
    pccs: tuple[FakePccs, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = pccs
    quote = sample("dcap-qvl/tdx_quote")
    assert main(["evidence", "verify", str(quote), "--pccs", address, "--at", "2025-07-01"]) == 0
    assert json.loads(capsys.readouterr().out)["tcb_status"] == "UpToDate"
