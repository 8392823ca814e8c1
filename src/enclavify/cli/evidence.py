"""`enclavify evidence`: verify attestation evidence and print what it proves."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from enclavify.attest import verify
from enclavify.attest.claims import EVIDENCE_TYPES, SGX_DCAP, TDX, claims_to_dict
from enclavify.attest.collateral import Collateral
from enclavify.attest.pccs import CollateralService
from enclavify.errors import AttestationError, UsageError


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "evidence",
        help="verify attestation evidence",
        description="Work with attestation evidence.",
    )
    commands = parser.add_subparsers(dest="evidence_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "verify",
        help="verify evidence and print its claims as JSON",
        description=(
            "Verify SGX DCAP, TDX, SEV-SNP or simulation evidence and print the verified claims "
            "as JSON. A rejection prints the reason and exits with status 1."
        ),
    )
    check.add_argument("file", type=Path, help="the evidence file")
    check.add_argument(
        "--type",
        choices=EVIDENCE_TYPES,
        help="evidence type (default: detected from the quote header, report size or JSON form)",
    )
    check.add_argument(
        "--collateral",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help=(
            "collateral: dcap-qvl JSON for SGX and TDX; VCEK/VLEK, ASK, ARK certificates "
            "and CRLs (PEM or DER) for SEV-SNP; repeat for several files"
        ),
    )
    check.add_argument(
        "--pccs",
        metavar="URL",
        help="fetch SGX and TDX collateral from this PCCS-style caching service",
    )
    check.add_argument(
        "--pccs-ca",
        metavar="FILE",
        help="CA certificates (PEM) to check the caching service's TLS certificate with",
    )
    check.add_argument(
        "--at",
        metavar="TIME",
        help="verify as of this ISO 8601 time instead of now (UTC when no offset is given)",
    )
    check.set_defaults(handler=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read evidence {str(args.file)!r}: {error.strerror}") from error
    now = _parse_time(args.at) if args.at else datetime.now(UTC)
    if args.collateral and args.pccs:
        raise UsageError("give either --collateral or --pccs, not both")
    collateral = Collateral.load(args.collateral) if args.collateral else None
    evidence_type = args.type or _detect_type(args.file, data)
    if args.pccs:
        if evidence_type not in (SGX_DCAP, TDX):
            raise UsageError(f"--pccs serves SGX and TDX collateral, not {evidence_type}")
        try:
            service = CollateralService(args.pccs, ca_file=args.pccs_ca)
        except ValueError as error:
            raise UsageError(str(error)) from error
        collateral = service.collateral_for(data, now=now)
    claims = verify.verify_evidence(evidence_type, data, now=now, collateral=collateral)
    print(json.dumps(claims_to_dict(claims), indent=2, sort_keys=True))
    return 0


def _detect_type(path: Path, data: bytes) -> str:
    try:
        return verify.detect_evidence_type(data)
    except AttestationError as error:
        raise UsageError(
            f"{str(path)!r}: {error.diagnostics()}; give it with --type"
            f" ({', '.join(EVIDENCE_TYPES)})"
        ) from error


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as error:
        raise UsageError(f"--at {text!r} is not an ISO 8601 time") from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
