"""``enclavify image convert|inspect``: command-line front end of :mod:`enclavify.convert`.

``convert`` prints the new image's OCI manifest digest on stdout and reports progress on
stderr, where the last line of a ``docker-archive:`` or engine destination gives the image ID
that engines list instead. The fspf key goes only into the result file (mode 0600), never to
either stream.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from enclavify import convert
from enclavify.errors import UsageError
from enclavify.progress import for_stream, format_bytes
from enclavify.runtime.cache import default_cache_dir

# The runtime cache is keyed by everything a runtime build reads, so bypassing it is for
# measuring a cold build or for a cache directory that cannot be trusted.
NO_CACHE_VARIABLE = "ENCLAVIFY_NO_RUNTIME_CACHE"

_TRANSPORTS = (
    "oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG], "
    "docker://HOST/REPO[:TAG], or an engine name"
)


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "image", help="convert images into confidential ones and inspect them"
    )
    commands = parser.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    _register_convert(commands)
    _register_inspect(commands)


def _register_convert(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "convert",
        help="convert a native image into a confidential one",
        description=(
            "Encrypt the directories given with --dir into a protected file system, remove "
            "their plaintext from every layer, add the launcher and write the confidential "
            "image. The fspf key, the measurement and the original command go into the result "
            "file (mode 0600), from which the session is made."
        ),
    )
    parser.add_argument("--from", dest="source", required=True, metavar="IMAGE",
                        help=f"the native image: {_TRANSPORTS}")
    parser.add_argument("--to", dest="destination", required=True, metavar="IMAGE",
                        help="the confidential image to write, same forms as --from")
    parser.add_argument("--dir", dest="dirs", action="append", default=[], metavar="DIR",
                        help="absolute directory of the image to encrypt (repeatable, at least "
                             "one)")
    parser.add_argument("--plain", action="append", default=[], metavar="DIR",
                        help="absolute directory that stays in the clear; recorded in the result "
                             "(repeatable)")
    parser.add_argument("--binary", required=True, metavar="PATH",
                        help="the program the launcher measures and starts, e.g. /usr/bin/python3")
    parser.add_argument("--heap", default="1G", metavar="SIZE",
                        help="heap size, 8M to 60G, suffixes k, m, g (default 1G)")
    parser.add_argument("--stack", default="4M", metavar="SIZE",
                        help="stack size, 32K to 8M (default 4M)")
    parser.add_argument("--dlopen", default="2", choices=("0", "1", "2"),
                        help="dlopen setting; 2 allows any library and is meant for debugging "
                             "(default 2)")
    parser.add_argument("--platform", metavar="OS/ARCH",
                        help="the platform to take from a multi-platform source")
    parser.add_argument("--base", metavar="IMAGE",
                        help="take the launcher's Python from this image (for a source without "
                             "a usable Python)")
    parser.add_argument("--result", metavar="FILE",
                        help="where to write the result (default: <destination>.enclavify.json "
                             "in the current directory)")
    parser.add_argument("--cas", dest="cas_address", metavar="HOST[:PORT]",
                        help="the CAS the launcher asks for its configuration")
    parser.add_argument("--cas-cert", metavar="FILE",
                        help="PEM certificate of the CAS; the launcher trusts only this one")
    parser.add_argument("--config-id", metavar="NS/SESSION/SERVICE",
                        help="the configuration the launcher requests from the CAS")
    parser.add_argument("--no-runtime-cache", action="store_true",
                        help="build the launcher's runtime afresh, neither reading nor filling "
                             "the runtime cache in $XDG_CACHE_HOME/enclavify/runtime (default "
                             f"~/.cache/enclavify/runtime); setting {NO_CACHE_VARIABLE}=1 does "
                             "the same")
    parser.add_argument("--compression", choices=("gzip", "none"),
                        help="compression of the layers the conversion writes, rewritten and "
                             "runtime (the ciphertext layer is never compressed; kept layers "
                             "stay as they are); default gzip for a docker:// registry and none "
                             "elsewhere, as buildah does: engines and docker archives store "
                             "layers uncompressed")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.set_defaults(handler=handle_convert)


def _register_inspect(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "inspect",
        help="show what an image protects, its runtime and its measurement",
        description=(
            "Show the protected directories, the runtime version and where its interpreter "
            "came from, and the measurement (recomputed from the image's files). A native "
            "image is reported as not confidential (exit code 0); a confidential image whose "
            "parts disagree is reported with its problems (exit code 1)."
        ),
    )
    parser.add_argument("image", metavar="IMAGE", help=_TRANSPORTS)
    parser.add_argument("--platform", metavar="OS/ARCH",
                        help="the platform to take from a multi-platform image")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(handler=handle_inspect)


def handle_convert(args: argparse.Namespace) -> int:
    cas_certificate = None
    if args.cas_cert is not None:
        try:
            cas_certificate = Path(args.cas_cert).read_bytes()
        except OSError as error:
            raise UsageError(
                f"--cas-cert {args.cas_cert!r} cannot be read: {error.strerror}"
            ) from error
    options = convert.ConvertOptions(
        source=args.source,
        destination=args.destination,
        binary=args.binary,
        protected=tuple(args.dirs),
        plain=tuple(args.plain),
        heap=convert.parse_size(args.heap, option="--heap", bounds=convert.HEAP_RANGE),
        stack=convert.parse_size(args.stack, option="--stack", bounds=convert.STACK_RANGE),
        dlopen=int(args.dlopen),
        platform=args.platform,
        base=args.base,
        result_path=Path(args.result) if args.result else None,
        cas_address=args.cas_address,
        cas_certificate=cas_certificate,
        config_id=args.config_id,
        runtime_cache=_runtime_cache(args),
        compression=args.compression,
    )
    progress = for_stream(sys.stderr, quiet=args.quiet, bars=not args.no_color)
    result = convert.convert_image(options, progress=progress)
    print(result.digest)
    if not args.quiet:
        print(f"measurement: {result.measurement}", file=sys.stderr)
        print(f"result file: {result.result_path} (contains the fspf key; keep it secret)",
              file=sys.stderr)
        if result.plain:
            print(f"in the clear (--plain): {', '.join(result.plain)}", file=sys.stderr)
    return 0


def _runtime_cache(args: argparse.Namespace) -> Path | None:
    if args.no_runtime_cache or os.environ.get(NO_CACHE_VARIABLE, "") not in ("", "0"):
        return None
    return default_cache_dir()


def handle_inspect(args: argparse.Namespace) -> int:
    inspection = convert.inspect_image(args.image, platform=args.platform)
    if args.json:
        print(json.dumps(inspection.to_json(), indent=2, sort_keys=True))
    else:
        for line in format_inspection(inspection):
            print(line)
    # A confidential image whose parts disagree (a recomputed measurement that differs from
    # its label, a missing fspf) is reported in full and fails the command.
    return 1 if inspection.problems else 0


def format_inspection(inspection: Any) -> list[str]:
    """Render an :class:`enclavify.convert.Inspection` as plain text lines."""
    if not inspection.confidential:
        return [
            f"{inspection.image}: not a confidential image",
            "  no protected file system (/.enclavify/fspf) and no launcher runtime "
            "(/opt/enclavify); every file is stored in the clear",
        ]
    lines = [f"{inspection.image}: confidential image ({inspection.platform})"]
    lines.append("  protected directories (encrypted):")
    lines.extend(f"    {region}" for region in inspection.regions or ["(none)"])
    # Only the total shows: how many files there are and their sizes are in the encrypted fspf.
    lines.append(f"  encrypted data: {format_bytes(inspection.protected_bytes)}")
    if inspection.plain:
        lines.append("  left in the clear on request (--plain):")
        lines.extend(f"    {directory}" for directory in inspection.plain)
    lines.append(f"  runtime version: {inspection.runtime_version}")
    interpreter = inspection.interpreter
    if interpreter:
        lines.append(
            f"  interpreter: Python {interpreter.get('python_version')} "
            f"({interpreter.get('libc')}, {interpreter.get('arch')}), copied from "
            f"{interpreter.get('path')} of {interpreter.get('source')}"
        )
    lines.append(f"  binary: {inspection.binary}")
    lines.append(
        f"  heap {_size(inspection.heap)}, stack {_size(inspection.stack)}, "
        f"dlopen {inspection.dlopen}"
    )
    lines.append(f"  measurement: {inspection.measurement}")
    if inspection.measurement_recomputed == inspection.measurement:
        lines.append("    (recomputed from the image's files: matches)")
    else:
        lines.append(f"    recomputed from the image's files: {inspection.measurement_recomputed}")
    lines.append(f"  CAS: {inspection.cas_address or '(none)'}")
    if inspection.cas_fingerprint:
        lines.append(f"  CAS certificate SHA-256: {inspection.cas_fingerprint}")
    lines.append(f"  configuration id: {inspection.config_id or '(none)'}")
    lines.append(f"  runs as: {inspection.user or '(image default)'}")
    for problem in inspection.problems:
        lines.append(f"  PROBLEM: {problem}")
    return lines


def _size(count: int | None) -> str:
    """Return a byte count as ``1.0 GiB (1073741824 bytes)``."""
    return "(unknown)" if count is None else f"{format_bytes(count)} ({count} bytes)"
