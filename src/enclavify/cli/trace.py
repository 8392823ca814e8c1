"""``enclavify trace``: the directories to pass as ``--dir``, from an strace log or a traced run.

The directories go to stdout (one a line, as ``--dir=`` flags, or as JSON); what was left out
and why goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from enclavify import atomic, trace
from enclavify.errors import UsageError


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "trace",
        help="find the directories an application reads, from an strace log or by running it",
        description=(
            "Read an strace log (strace -f, with or without -o) or, with --image, run the image "
            "under strace on this host; then print the smallest set of directories to pass as "
            "--dir. System paths (/proc, /sys, /dev, /etc, /tmp, system libraries and "
            "binaries) stay in clear and are listed on stderr. With --image nothing is "
            "installed into the image: the host's strace attaches to the container's process "
            "before it starts (podman only; needs permission to ptrace it, e.g. root)."
        ),
        usage="%(prog)s [options] FILE\n       %(prog)s [options] --image IMAGE [-- COMMAND...]",
    )
    parser.add_argument("operands", nargs="*", metavar="FILE | COMMAND",
                        help="the strace log ('-' for stdin); with --image, the command to run "
                             "instead of the image's (after '--')")
    parser.add_argument("--image", metavar="IMAGE",
                        help="run this podman image under strace instead of reading a log")
    parser.add_argument("--seconds", type=float, default=10.0, metavar="N",
                        help="with --image: stop the container after N seconds (default 10)")
    parser.add_argument("--network", default="none", metavar="MODE",
                        help="with --image: podman network mode for the run (default none)")
    parser.add_argument("--save-log", type=Path, metavar="PATH",
                        help="with --image: also write the recorded strace log here")
    parser.add_argument("--cwd", metavar="DIR",
                        help="working directory of the first traced process, for relative "
                             "paths (with --image: the image's working directory)")
    parser.add_argument("--after-exec", action="store_true",
                        help="ignore the calls before the first successful execve (implied by "
                             "--image, where they are the container runtime's)")
    parser.add_argument("--format", choices=("lines", "flags", "json"), default="lines",
                        help="stdout: one directory a line, --dir= flags, or JSON with the "
                             "details (default lines)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.cwd is not None and not args.cwd.startswith("/"):
        raise UsageError(f"--cwd must be an absolute path, not {args.cwd!r}")
    if args.image:
        text, workdir = trace.record_image_trace(
            args.image, args.operands, seconds=args.seconds, network=args.network
        )
        if args.save_log is not None:
            atomic.write_bytes(args.save_log, text.encode(errors="surrogateescape"))
        result = trace.analyze(text, initial_cwd=args.cwd or workdir, after_first_execve=True)
    else:
        if len(args.operands) != 1:
            raise UsageError("give one strace log FILE, or --image IMAGE")
        if args.save_log is not None:
            raise UsageError("--save-log only applies with --image")
        text = _read_log(args.operands[0])
        result = trace.analyze(text, initial_cwd=args.cwd, after_first_execve=args.after_exec)

    _report(result)
    if args.format == "json":
        print(json.dumps({
            "directories": result.directories,
            "kept_in_clear": result.kept_in_clear,
            "unplaced": result.unplaced,
            "unresolved": result.unresolved,
        }, indent=2))
    elif args.format == "flags":
        print(" ".join(f"--dir={directory}" for directory in result.directories))
    else:
        for directory in result.directories:
            print(directory)
    return 0


def _read_log(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text(errors="surrogateescape")
    except OSError as error:
        raise UsageError(f"cannot read the strace log {name!r}: {error.strerror}") from error


def _report(result: trace.TraceResult) -> None:
    if result.kept_in_clear:
        kept = ", ".join(f"{root} ({count})" for root, count in result.kept_in_clear.items())
        print(f"trace: left in clear (system paths, files accessed): {kept}", file=sys.stderr)
    if result.unplaced:
        print("trace: files directly in / cannot be protected by a directory: "
              + ", ".join(result.unplaced), file=sys.stderr)
    if result.unresolved:
        print("trace: relative paths with an unknown base (give --cwd?): "
              + ", ".join(result.unresolved[:20])
              + (" ..." if len(result.unresolved) > 20 else ""), file=sys.stderr)
    if result.skipped_lines:
        print(f"trace: {result.skipped_lines} lines were not system calls and were skipped",
              file=sys.stderr)
    if not result.directories:
        print("trace: no directory outside the system paths was accessed", file=sys.stderr)
