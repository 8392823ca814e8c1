"""``sconify_image``: the seed-compatible one-step command.

It converts an image, fills the session template, uploads the session to the CAS, writes the
filled session and a compose file, and prints ``NAMESPACE/NAME`` alone on stdout so that
``SESSION=$(sconify_image ...)`` works. Everything else goes to stderr. The work itself is in
:mod:`enclavify.sconify`; this module only parses and reports.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from enclavify.cli import add_logging_flags, configure_logging, run_handler
from enclavify.errors import UsageError
from enclavify.sconify import SconifyOptions, sconify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sconify_image",
        description=(
            "Convert a container image into a confidential one, create its session on the CAS "
            "and print the session name (NAMESPACE/NAME) on stdout."
        ),
    )
    required = parser.add_argument_group("required")
    required.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="IMAGE",
        help="the native image (engine name, oci:, oci-archive:, docker-archive:, docker://)",
    )
    required.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="IMAGE",
        help="the confidential image to write, same transports as --from",
    )
    required.add_argument(
        "--binary",
        required=True,
        metavar="PATH",
        help="the program the launcher measures and starts, e.g. /usr/bin/python3",
    )
    required.add_argument(
        "--name", required=True, metavar="NAME", help="the session's name inside the namespace"
    )

    content = parser.add_argument_group("content")
    content.add_argument(
        "--dir",
        dest="dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="encrypt this directory (repeatable)",
    )
    content.add_argument(
        "--plain",
        dest="plain",
        action="append",
        default=[],
        metavar="DIR",
        help="keep this directory in clear (repeatable)",
    )
    content.add_argument(
        "--base",
        metavar="IMAGE",
        help="image with the interpreter for the launcher, if the native one has no usable Python",
    )
    content.add_argument("--heap", default="1G", help="heap size setting, 8M to 60G (default 1G)")
    content.add_argument("--stack", default="4M", help="stack size setting, 32K to 8M (default 4M)")
    content.add_argument(
        "--dlopen",
        default="2",
        choices=("0", "1", "2"),
        help="dlopen setting; 2 is for debugging only (default 2)",
    )
    content.add_argument(
        "--platform", metavar="OS/ARCH", help="pick this platform from a multi-platform source"
    )

    session = parser.add_argument_group("session")
    session.add_argument(
        "--cas",
        default=os.environ.get("ENCLAVIFY_CAS_ADDR", "localhost:8081"),
        metavar="ADDR",
        help="CAS address host[:port] (default localhost:8081)",
    )
    session.add_argument(
        "--cas-cert",
        metavar="FILE",
        help="CAS certificate to pin (default: $ENCLAVIFY_CAS_CERT, else the local CAS's)",
    )
    session.add_argument(
        "--namespace", metavar="NS", help="namespace of the session (default: a random one)"
    )
    session.add_argument(
        "--create-namespace",
        action="store_true",
        help="create the namespace session first if it does not exist",
    )
    session.add_argument(
        "--template",
        metavar="FILE",
        help="session template (default: ./session-template.yml if present, else the built-in one)",
    )
    session.add_argument(
        "--session",
        dest="session_file",
        default="session.yml",
        metavar="FILE",
        help="where to write the filled session (default session.yml, mode 0600)",
    )
    session.add_argument(
        "--service-name",
        default="service",
        metavar="NAME",
        help="the service's name in the session (default service)",
    )
    session.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add or override an environment variable of the service (repeatable)",
    )
    session.add_argument(
        "--command",
        metavar="CMD",
        help="the service's command line (default: the image's entrypoint and command)",
    )
    session.add_argument(
        "--allow-debug-mode",
        action="store_true",
        help="INSECURE: let the session accept TEEs in debug mode",
    )
    session.add_argument(
        "--attestation-mode",
        choices=("auto", "hardware", "simulation"),
        default="auto",
        help="evidence the session accepts; 'simulation' is INSECURE and proves nothing "
        "about the host; 'auto' picks hardware when this machine has a TEE device, "
        "simulation otherwise, with a warning (default auto)",
    )
    session.add_argument(
        "--identity",
        metavar="FILE",
        help="client key and certificate for the CAS (default ~/.config/enclavify/identity.pem)",
    )
    session.add_argument(
        "--compose",
        dest="compose_file",
        default="docker-compose.yml",
        metavar="FILE",
        help="where to write the compose file (default docker-compose.yml)",
    )
    session.add_argument(
        "--result", metavar="FILE", help="where to write the conversion result (mode 0600)"
    )
    session.add_argument(
        "--dry-run",
        action="store_true",
        help="convert and write the session and compose files, but upload nothing (the CAS"
        " certificate is still needed, because the image pins it)",
    )
    add_logging_flags(parser)
    return parser


def random_namespace() -> str:
    return f"namespace-{secrets.token_hex(6)}"


def parse_environment(pairs: Sequence[str]) -> dict[str, str]:
    environment: dict[str, str] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise UsageError(f"--env {pair!r} is not KEY=VALUE")
        environment[key] = value
    return environment


def handle(args: argparse.Namespace) -> int:
    template = Path(args.template) if args.template else None
    if template is None and Path("session-template.yml").is_file():
        template = Path("session-template.yml")

    options = SconifyOptions(
        source=args.source,
        target=args.target,
        binary=args.binary,
        name=args.name,
        namespace=args.namespace or random_namespace(),
        dirs=tuple(args.dirs),
        plain=tuple(args.plain),
        base=args.base,
        heap=args.heap,
        stack=args.stack,
        dlopen=args.dlopen,
        platform=args.platform,
        cas=args.cas,
        cas_cert=Path(args.cas_cert) if args.cas_cert else None,
        create_namespace=args.create_namespace,
        template=template,
        session_file=Path(args.session_file),
        service_name=args.service_name,
        environment=parse_environment(args.env),
        command=args.command,
        allow_debug_mode=args.allow_debug_mode,
        attestation_mode=args.attestation_mode,
        identity=Path(args.identity) if args.identity else None,
        compose_file=Path(args.compose_file),
        result_file=Path(args.result) if args.result else None,
        dry_run=args.dry_run,
        # The seed's hooks: YAML fragments in the environment, never on the command line.
        secrets_hook=os.environ.get("SECRETS") or None,
        injected_files_hook=os.environ.get("INJECTED_FILES") or None,
        show_progress=not args.no_color,
    )
    session_name = sconify(options)
    print(session_name)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return run_handler(handle, args, prog="sconify_image")


if __name__ == "__main__":
    sys.exit(main())
