"""`enclavify cas`: run the CAS, show its certificate, read and verify its audit log."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from enclavify.cas import audit
from enclavify.cas.client import pem_fingerprint
from enclavify.cas.paths import CA_CERT, database_url, default_data_dir
from enclavify.cas.storage import Database
from enclavify.errors import Error, UsageError


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "cas", help="run the configuration and attestation service (CAS)"
    )
    commands = parser.add_subparsers(dest="cas_command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="serve the CAS over HTTPS")
    _add_data(serve)
    serve.add_argument(
        "--listen", default="127.0.0.1:8081", metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:8081; port 0 picks a free one)",
    )
    _add_db(serve)
    serve.add_argument(
        "--san", action="append", default=[], metavar="NAME",
        help="extra DNS name or IP address for the server certificate (repeatable)",
    )
    serve.add_argument(
        "--nonce-lifetime", type=float, default=60.0, metavar="SECONDS",
        help="how long an attestation challenge nonce stays valid (default 60)",
    )
    serve.set_defaults(handler=_serve)

    show = commands.add_parser("show-certificate", help="print the CAS CA certificate (PEM)")
    _add_data(show)
    show.add_argument(
        "--fingerprint", action="store_true",
        help="print the SHA-256 fingerprint (hex, of the DER certificate) instead",
    )
    show.set_defaults(handler=_show_certificate)

    audit = commands.add_parser("audit", help="print the audit log as JSON lines")
    _add_data(audit)
    _add_db(audit)
    audit.add_argument(
        "--verify", action="store_true",
        help="check the hash chain and the head file instead of printing; exit 1 on damage",
    )
    audit.set_defaults(handler=_audit)


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, metavar="DIR",
        help="data directory (default $ENCLAVIFY_CAS_DATA or ~/.local/share/enclavify/cas)",
    )


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", metavar="URL",
        help="database: postgresql://USER@HOST:PORT/DB (default SQLite in the data directory)",
    )


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data) if args.data else default_data_dir()


def _serve(args: argparse.Namespace) -> int:
    # aiohttp is imported only when serving, so other commands start quickly.
    from enclavify.cas.server import open_cas, serve  # noqa: PLC0415

    data_dir = _data_dir(args)
    if not 0 < args.nonce_lifetime <= 3600:
        raise UsageError("--nonce-lifetime must be between 0 and 3600 seconds")
    setup = open_cas(
        data_dir, db=args.db, sans=tuple(args.san), nonce_lifetime=args.nonce_lifetime
    )
    fingerprint = setup.pki.fingerprint()
    if setup.created:
        print(f"enclavify CAS: created a new CA in {data_dir}", file=sys.stderr)
    print(f"enclavify CAS: certificate fingerprint {fingerprint}", file=sys.stderr)

    def ready(address: str) -> None:
        print(f"enclavify CAS: listening on https://{address}", file=sys.stderr, flush=True)

    asyncio.run(serve(setup, args.listen, on_ready=ready))
    return 0


def _show_certificate(args: argparse.Namespace) -> int:
    path = _data_dir(args) / CA_CERT
    try:
        pem = path.read_bytes()
    except FileNotFoundError as error:
        raise UsageError(f"no CAS certificate at {path}: run 'enclavify cas serve' first") \
            from error
    if args.fingerprint:
        print(pem_fingerprint(pem))
    else:
        sys.stdout.write(pem.decode("ascii"))
    return 0


def _audit(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    url = database_url(data_dir, args.db)
    if not args.db and not Path(url).exists():
        raise UsageError(f"no CAS database at {url}")
    database = Database.open(url)
    head_path = data_dir / audit.HEAD_FILE
    try:
        if args.verify:
            result = audit.verify_chain(database, audit.HeadFile(head_path))
            for problem in result.problems:
                print(f"audit: {problem}", file=sys.stderr)
            has_head = head_path.exists()
            if not has_head:
                print(
                    f"audit: no head file at {head_path}: truncation at the end of the log"
                    " cannot be detected", file=sys.stderr,
                )
            if not result.ok:
                raise Error(f"audit log damaged: {len(result.problems)} problem(s)")
            print(f"audit log intact: {result.records} records, head {result.head_hash}")
            against_head = ", and the end of the log against the head file" if has_head else ""
            print(
                f"checked: every record's hash and link and the database's head row{against_head};"
                " not detectable: a rollback of the database and the data directory together"
            )
            return 0
        for seq, record, _prev, digest in audit.iter_records(database):
            print(json.dumps({"seq": seq, **record, "hash": digest}, sort_keys=True))
        return 0
    finally:
        database.close()
