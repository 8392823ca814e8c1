"""`enclavify session`: create, update and read sessions on a CAS."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from enclavify.cas.client import CasClient
from enclavify.cas.identity import identity_key_hash, load_or_create_identity
from enclavify.cas.paths import pinned_ca_certificate
from enclavify.errors import PolicyError, UsageError
from enclavify.policy import parse_session


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "session", help="create, update and read sessions on a CAS"
    )
    commands = parser.add_subparsers(dest="session_command", metavar="COMMAND", required=True)
    session_file = "the session's YAML file"
    session_name = "the session's name, NAMESPACE/NAME"
    specs = (
        ("create", "upload a new session from FILE", "FILE", session_file, _create),
        ("update", "upload FILE as the next revision (predecessor filled in)", "FILE",
         session_file, _update),
        ("show", "print the session NAME (secrets redacted) as JSON", "NAME", session_name,
         _show),
        ("history", "print the revisions of session NAME as JSON", "NAME", session_name,
         _history),
        ("values", "print the exported public values of session NAME as JSON", "NAME",
         session_name, _values),
    )
    for name, help_text, metavar, target_help, handler in specs:
        command = commands.add_parser(name, help=help_text)
        add_cas_flags(command)
        command.add_argument("target", metavar=metavar, help=target_help)
        command.set_defaults(handler=handler)

    identity = commands.add_parser(
        "identity",
        help="print this client's key hash, the entry to put in another session's access_policy",
    )
    identity.add_argument(
        "--identity", type=Path, metavar="FILE",
        help="client key and certificate (default ~/.config/enclavify/identity.pem; made on"
        " first use)",
    )
    identity.set_defaults(handler=_identity)


def add_cas_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--cas``, ``--cas-cert`` and ``--identity``, shared by commands that talk to a CAS."""
    parser.add_argument(
        "--cas", default=os.environ.get("ENCLAVIFY_CAS_ADDR", "localhost:8081"), metavar="ADDR",
        help="CAS address HOST[:PORT] (default $ENCLAVIFY_CAS_ADDR or localhost:8081)",
    )
    parser.add_argument(
        "--cas-cert", type=Path, metavar="FILE",
        help="the CAS CA certificate (default $ENCLAVIFY_CAS_CERT, else the local CAS's)",
    )
    parser.add_argument(
        "--identity", type=Path, metavar="FILE",
        help="client key and certificate (default ~/.config/enclavify/identity.pem; made on"
        " first use)",
    )


def make_client(args: argparse.Namespace, *, with_identity: bool = True) -> CasClient:
    """Build a CasClient from the ``--cas``, ``--cas-cert`` and ``--identity`` flags."""

    ca_pem = pinned_ca_certificate(args.cas_cert)
    identity = load_or_create_identity(args.identity) if with_identity else None
    return CasClient(args.cas, ca_pem=ca_pem, identity=identity)


def _read(path_text: str) -> str:
    """Read a session file and check it here, so that an error names the file."""
    path = Path(path_text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read session file {path}: {error}") from error
    try:
        parse_session(text)
    except PolicyError as error:
        raise PolicyError(f"{path}: {error.diagnostics()}") from error
    return text


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _create(args: argparse.Namespace) -> int:
    text = _read(args.target)
    print(make_client(args).create_session(text))
    return 0


def _update(args: argparse.Namespace) -> int:
    text = _read(args.target)
    client = make_client(args)
    name = parse_session(text).name
    current = client.get_session(name)["hash"]
    print(client.update_session(set_predecessor(text, current)))
    return 0


def set_predecessor(text: str, predecessor: str) -> str:
    """Return the session document with ``predecessor`` set, keeping the rest of the text."""
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except ValueError as error:
            raise UsageError(f"session file is not valid JSON: {error}") from error
        document["predecessor"] = predecessor
        return json.dumps(document, indent=2)
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("predecessor:")]
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    return "".join(kept) + f"predecessor: {predecessor}\n"


def _identity(args: argparse.Namespace) -> int:
    print(identity_key_hash(load_or_create_identity(args.identity)))
    return 0


def _show(args: argparse.Namespace) -> int:
    _print(make_client(args).get_session(args.target))
    return 0


def _history(args: argparse.Namespace) -> int:
    _print(make_client(args).session_history(args.target))
    return 0


def _values(args: argparse.Namespace) -> int:
    _print(make_client(args, with_identity=False).public_values(args.target))
    return 0
