"""`enclavify device` and `determine_sgx_device`: which TEE interfaces this machine has."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from enclavify.attest import devices

SIMULATION_ONLY = "no SGX device found: only simulation mode is possible on this machine"


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "device",
        help="list the TEE devices of this machine",
        description="List the SGX, TDX, SEV-SNP and configfs-tsm interfaces found on this machine.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    parser.add_argument(
        "--root",
        default="/",
        help="look for devices under this directory instead of / (default: %(default)s)",
    )
    parser.set_defaults(handler=run_device)


def run_device(args: argparse.Namespace) -> int:
    found = devices.detect(args.root)
    if args.json:
        print(json.dumps([{"kind": device.kind, "path": device.path} for device in found]))
    else:
        for device in found:
            print(f"{device.kind}\t{device.path}")
    if not found:
        print("no TEE device found: only simulation mode is possible", file=sys.stderr)
    return 0


def determine_sgx_device_main(argv: Sequence[str] | None = None) -> int:
    """Print the SGX device path for ``--device`` flags, or nothing when there is none."""
    parser = argparse.ArgumentParser(
        prog="determine_sgx_device",
        description="Print the path of this machine's SGX device, or nothing when there is none.",
    )
    parser.add_argument("--root", default="/", help="look under this directory instead of /")
    args = parser.parse_args(argv)
    device = devices.sgx_device(args.root)
    if device is None:
        print(SIMULATION_ONLY, file=sys.stderr)
        return 0
    print(device.path)
    return 0
