"""Find the directories an application reads, from an strace log, to pass as ``--dir``.

:func:`parse_strace` turns the text of ``strace -f`` output (written with or without ``-o``)
into the file accesses it records; :func:`choose_directories` groups those paths into the
smallest set of directory roots worth protecting, leaving system paths in clear;
:func:`analyze` does both. These three are pure: text in, result out.

:func:`record_image_trace` is the one function here with side effects: it runs an image
under podman and strace on this host and returns the log.

Understood log syntax: ``[pid N]`` and ``N `` line prefixes, ``-t``/``-tt``/``-ttt``/``-r``
time stamps, ``-T`` durations, ``-y`` descriptor paths, ``<unfinished ...>`` and
``<... NAME resumed>`` pairs (joined per pid), and C-style escapes in strings (``\\xNN``,
octal, ``\\"``). Relative paths are resolved against the descriptor or the pid's working
directory, which is tracked through ``chdir``/``fchdir``, ``dup``/``fcntl(F_DUPFD)``/``close``
and inherited across ``clone``/``fork``.
"""

from __future__ import annotations

import logging
import posixpath
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from enclavify.errors import ImageError, UsageError

log = logging.getLogger(__name__)

# Paths the application reads but which stay in clear: kernel interfaces, configuration the
# host or engine provides, scratch space, the loader and its cache, system libraries and
# binaries (the interpreter is measured through --binary instead).
SYSTEM_ROOTS = (
    "/proc", "/sys", "/dev", "/etc", "/run", "/var/run", "/var/cache",
    "/tmp", "/var/tmp",  # noqa: S108 - names of scratch paths, not files this code writes
    "/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin",
    "/lib", "/lib32", "/lib64", "/libx32", "/usr/lib32", "/usr/lib64", "/usr/libx32",
    "/usr/lib/locale", "/usr/lib/ssl", "/usr/lib/os-release", "/usr/lib/gconv",
    "/usr/share/zoneinfo", "/usr/share/locale", "/usr/share/i18n", "/usr/share/ca-certificates",
)
# Debian's multiarch library directories, /usr/lib/x86_64-linux-gnu and the like.
_MULTIARCH = re.compile(r"^/usr/lib/[a-z0-9_]+-linux-(?:gnu|musl)[a-z0-9_]*(?:/|$)")
# Shared libraries placed straight into /usr/lib by distributions without multiarch (Alpine).
_USR_LIB_LIBRARY = re.compile(r"^/usr/lib/(?:lib|ld-)[^/]*\.so(?:\.[^/]*)?$")
# A Python installation's library directory is a root of its own.
_PYTHON_LIB = re.compile(
    r"^(/(?:usr/(?:local/)?|opt/[^/]+/)?lib(?:64)?/python\d+(?:\.\d+)?)(?:/|$)"
)
# Directories whose children are separate pieces of software: the root is one level deeper.
_CONTAINERS = (
    "/usr/lib", "/usr/local/lib", "/usr/share", "/usr/local/share", "/usr/libexec",
    "/usr/local/libexec", "/opt", "/var/lib", "/srv", "/home", "/usr/local",
)

# Failures that still show the path exists, so the application depends on it.
_EXISTING_ERRNOS = frozenset({"EACCES", "EPERM", "EINVAL", "ELOOP", "EISDIR", "EEXIST",
                              "ETXTBSY", "EROFS", "ENXIO", "ENODEV"})

_PREFIX = re.compile(
    r"^(?:\[pid\s+(?P<bracketed>\d+)\]\s+|(?P<plain>\d+)\s+)?"
    r"(?:\d{2}:\d{2}:\d{2}(?:\.\d+)?\s+|\d{9,}\.\d+\s+|\s*\d+\.\d{6}\s+)?"
)
_RESUMED = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>\s?(?P<rest>.*)$")
_CALL = re.compile(r"^(?P<name>\w+)\(")
_RESULT = re.compile(
    r"^\s*=\s*(?P<value>-?\d+|0x[0-9a-f]+|\?)(?:<(?P<path>[^>]*)>)?(?:\s+(?P<errno>E[A-Z0-9]+))?"
)
_FD_ARG = re.compile(r"^(?P<fd>-?\d+|AT_FDCWD)(?:<(?P<path>.*)>)?$")
_UNKNOWN_PID = -1


@dataclass(frozen=True)
class Access:
    """One file system access: the syscall, the pid that made it and the absolute path.

    ``directory`` is True when the call shows the path is a directory (a stat result of type
    ``S_IFDIR``, an open with ``O_DIRECTORY``, a ``chdir``).
    """

    pid: int
    syscall: str
    path: str
    directory: bool = False


@dataclass
class TraceResult:
    """The files an application needs, as an strace log shows them.

    ``directories`` are the roots to protect, sorted, none inside another. ``kept_in_clear``
    maps each system root to the number of accessed paths under it; ``unplaced`` lists
    accessed files directly in ``/`` (no directory to protect them with); ``unresolved`` lists
    relative paths whose base directory the log does not show.
    """

    directories: list[str]
    kept_in_clear: dict[str, int]
    unplaced: list[str]
    unresolved: list[str]
    accesses: list[Access]
    skipped_lines: int = 0


@dataclass
class _Call:
    pid: int
    name: str
    args: list[str]
    value: str
    errno: str | None
    result_path: str | None


@dataclass
class _Process:
    cwd: list[str | None]                        # shared between CLONE_FS siblings
    fds: dict[int, str] = field(default_factory=dict)  # shared between CLONE_FILES siblings


# ----------------------------------------------------------------------------- parsing


def decode_string(literal: str) -> str | None:
    """Decode one strace string argument (``"..."``), or return None when it is not one.

    A string strace cut short (``"..."...``) is returned without its missing tail; path
    arguments are never cut, so callers only meet that in argv.
    """
    literal = literal.strip()
    if not literal.startswith('"'):
        return None
    out = bytearray()
    i = 1
    while i < len(literal):
        char = literal[i]
        if char == '"':
            return out.decode("utf-8", "surrogateescape")
        if char != "\\":
            out += char.encode("utf-8", "surrogateescape")
            i += 1
            continue
        following = literal[i + 1 : i + 2]
        if following == "x":
            out.append(int(literal[i + 2 : i + 4], 16))
            i += 4
        elif following.isdigit():
            digits = re.match(r"[0-7]{1,3}", literal[i + 1 : i + 4])
            assert digits is not None
            out.append(int(digits.group(), 8))
            i += 1 + len(digits.group())
        else:
            out += {"n": b"\n", "t": b"\t", "r": b"\r", "v": b"\v", "f": b"\f"}.get(
                following, following.encode()
            )
            i += 2
    return None


def _split_call(text: str) -> tuple[list[str], str] | None:
    """Split ``name(args) = result`` after the ``(`` into top-level arguments and the rest."""
    args: list[str] = []
    depth = 0
    start = 0
    i = 0
    in_string = False
    while i < len(text):
        char = text[i]
        if in_string:
            if char == "\\":
                i += 2
                continue
            if char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "([{":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == ")":
            if depth == 0:
                last = text[start:i].strip()
                if last or args:
                    args.append(last)
                return args, text[i + 1 :]
            depth -= 1
        elif char == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1
    return None


def _records(text: str) -> Iterable[tuple[int | None, str]]:
    """Yield (pid, complete call text) per finished syscall, joining unfinished/resumed pairs.

    The pid is None for unprefixed lines. strace -f without -o leaves the prefix off whenever
    only one process is traced, so the halves of one call can carry different prefixes.
    """
    pending: dict[int | None, str] = {}
    broken: tuple[int | None] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        prefix = _PREFIX.match(line)
        assert prefix is not None  # every part of the pattern is optional
        number = prefix.group("bracketed") or prefix.group("plain")
        pid = int(number) if number else None
        body = line[prefix.end() :]
        if body.startswith(("+++", "---", "strace:", "????")) or "<detached ...>" in body:
            continue
        if broken is not None:
            # The line after an attach notice that broke a call in two: either the call goes
            # on in a later "resumed" line, or this line is the rest of it.
            owner, broken = broken[0], None
            if body.strip() == "<unfinished ...>":
                continue
            if owner in pending and not _CALL.match(body) and not _RESUMED.match(body):
                pid = owner
                body = pending.pop(owner) + body
        resumed = _RESUMED.match(body)
        if resumed:
            owners = _pending_owners(pending, pid, resumed.group("name"))
            if len(owners) != 1:
                continue  # its start is before the log begins, or it is ambiguous
            head = pending.pop(owners[0])
            pid = owners[0] if pid is None else pid
            body = head + resumed.group("rest")
        notice = body.find("strace: Process ")
        if notice > 0:
            # strace wrote its attach notice into the middle of a call that forks.
            pending[pid] = body[:notice]
            broken = (pid,)
            continue
        if body.endswith("<unfinished ...>"):
            pending[pid] = body[: -len("<unfinished ...>")].rstrip()
            continue
        yield pid, body


def _pending_owners(pending: dict[int | None, str], pid: int | None, name: str) -> list[int | None]:
    """Find whose unfinished call a resumed line continues: its own pid, else the other style."""
    if pid in pending:
        return [pid]
    return [
        owner for owner, head in pending.items()
        if (pid is None or owner is None) and head.startswith(name + "(")
    ]


def _parse_call(pid: int, body: str) -> _Call | None:
    match = _CALL.match(body)
    if not match:
        return None
    split = _split_call(body[match.end() :])
    if split is None:
        return None
    args, rest = split
    result = _RESULT.match(rest)
    if not result:
        return None
    return _Call(pid, match.group("name"), args, result.group("value"), result.group("errno"),
                 result.group("path"))


# ----------------------------------------------------------------------------- replay


class _Replay:
    """Follow working directories and descriptors per pid while reading calls in order."""

    def __init__(self, initial_cwd: str | None) -> None:
        self.initial_cwd = initial_cwd
        self.processes: dict[int, _Process] = {}
        self.parents: dict[int, tuple[int, str]] = {}  # child pid -> (parent pid, clone flags)
        self.first_pid: int | None = None
        self.accesses: list[Access] = []
        self.unresolved: list[str] = []

    def adopt_unprefixed(self, pid: int) -> None:
        """Give the state of unprefixed lines to ``pid``: strace -f without -o leaves the pid off
        the first process's lines until a second process exists."""
        self.first_pid = pid
        if _UNKNOWN_PID not in self.processes:
            return
        self.processes[pid] = self.processes.pop(_UNKNOWN_PID)
        self.accesses = [
            Access(pid, a.syscall, a.path, a.directory) if a.pid == _UNKNOWN_PID else a
            for a in self.accesses
        ]
        for child, (parent, flags) in list(self.parents.items()):
            if parent == _UNKNOWN_PID:
                self.parents[child] = (pid, flags)

    def process(self, pid: int) -> _Process:
        known = self.processes.get(pid)
        if known is not None:
            return known
        parent = self.parents.get(pid)
        if parent is not None and parent[0] == _UNKNOWN_PID and self.first_pid is not None:
            parent = (self.first_pid, parent[1])
        if (parent is not None and self.first_pid is None and parent[0] not in self.parents
                and parent[0] not in self.processes):
            # The parent is the first process, whose lines so far had no pid prefix.
            self.adopt_unprefixed(parent[0])
        if parent is not None and parent[0] in self.processes:
            source = self.processes[parent[0]]
            flags = parent[1]
            cwd = source.cwd if "CLONE_FS" in flags else list(source.cwd)
            created = _Process(cwd)
            created.fds = source.fds if "CLONE_FILES" in flags else dict(source.fds)
        else:
            created = _Process([self.initial_cwd])
        self.processes[pid] = created
        return created

    def base(self, pid: int, dirfd: str | None) -> str | None:
        """Return the directory a relative path in this call starts from, if the log shows it."""
        process = self.process(pid)
        if dirfd is None:
            return process.cwd[0]
        match = _FD_ARG.match(dirfd)
        if not match:
            return None
        if match.group("path"):
            return match.group("path")  # strace -y names the descriptor's path itself
        if match.group("fd") == "AT_FDCWD":
            return process.cwd[0]
        return process.fds.get(int(match.group("fd")))

    def resolve(self, pid: int, dirfd: str | None, raw: str) -> str | None:
        path = decode_string(raw)
        if not path:
            return None  # not a string, or "" with AT_EMPTY_PATH: the descriptor itself
        if not path.startswith("/"):
            base = self.base(pid, dirfd)
            if base is None:
                self.unresolved.append(path)
                return None
            path = posixpath.join(base, path)
        return posixpath.normpath(path).replace("//", "/")

    def record(self, call: _Call, dirfd: str | None, raw: str) -> str | None:
        failed = call.value.startswith("-") and call.errno is not None
        if failed and call.errno not in _EXISTING_ERRNOS:
            return None  # a look-up of something that is not there
        path = self.resolve(call.pid, dirfd, raw)
        if path is None:
            return None
        directory = any("S_IFDIR" in arg or "O_DIRECTORY" in arg for arg in call.args)
        self.accesses.append(Access(call.pid, call.name, path, directory))
        return path

    def remember_fd(self, call: _Call, path: str | None) -> None:
        if path is not None and call.value.isdigit():
            self.process(call.pid).fds[int(call.value)] = path

    def apply(self, call: _Call) -> None:
        name, args = call.name, call.args
        ok = call.value.isdigit() or call.value.startswith("0x")

        def arg(index: int) -> str:
            return args[index] if index < len(args) else ""

        if name in {"open", "creat"}:
            self.remember_fd(call, self.record(call, None, arg(0)))
        elif name in {"openat", "openat2"}:
            self.remember_fd(call, self.record(call, arg(0), arg(1)))
        elif name in {"stat", "lstat", "stat64", "lstat64", "access", "readlink", "execve",
                      "truncate", "chmod", "chown", "lchown", "mkdir", "rmdir", "unlink",
                      "statfs", "getxattr", "lgetxattr", "listxattr", "llistxattr",
                      "utime", "utimes"}:
            self.record(call, None, arg(0))
        elif name in {"newfstatat", "fstatat64", "statx", "faccessat", "faccessat2",
                      "readlinkat", "execveat", "mkdirat", "unlinkat", "fchmodat",
                      "fchownat", "utimensat", "name_to_handle_at"}:
            self.record(call, arg(0), arg(1))
        elif name in {"rename", "link", "symlink"}:
            self.record(call, None, arg(1))
            if name == "rename":
                self.record(call, None, arg(0))
        elif name in {"renameat", "renameat2", "linkat"}:
            self.record(call, arg(0), arg(1))
            self.record(call, arg(2), arg(3))
        elif name == "chdir" and ok:
            path = self.resolve(call.pid, None, arg(0))
            if path is not None:
                self.process(call.pid).cwd[0] = path
                self.accesses.append(Access(call.pid, name, path, directory=True))
        elif name == "fchdir" and ok:
            self.process(call.pid).cwd[0] = self.base(call.pid, arg(0))
        elif name in {"dup", "dup2", "dup3"} or (
            name == "fcntl" and arg(1).startswith("F_DUPFD")
        ):
            self.remember_fd(call, self.base(call.pid, arg(0)))
        elif name == "close" and ok and arg(0).isdigit():
            self.process(call.pid).fds.pop(int(arg(0)), None)
        elif name in _FORKS:
            self.process(call.pid)  # the parent's state must exist before its child copies it


_FORKS = frozenset({"clone", "clone2", "clone3", "fork", "vfork"})


def _clone_flags(call: _Call) -> str:
    # clone's flags are a named argument; clone3 has them in its structure, the first argument.
    return " ".join(arg for arg in call.args if "CLONE_" in arg)


def parse_strace(
    text: str, *, initial_cwd: str | None = None, after_first_execve: bool = False
) -> tuple[list[Access], list[str], int]:
    """Read an strace log and return (accesses, unresolved relative paths, skipped lines).

    ``initial_cwd`` is the first process's working directory, when known (the log cannot show
    it). With ``after_first_execve``, calls before the first successful ``execve`` are
    ignored: they belong to the container runtime that started the application.
    Raises :class:`UsageError` when the text contains no system call at all.
    """
    replay = _Replay(initial_cwd)
    # Children can log calls before their parent's clone returns, so learn every parent first.
    for pid_or_none, body in _records(text):
        call = _parse_call(_UNKNOWN_PID if pid_or_none is None else pid_or_none, body)
        if call is not None and call.name in _FORKS and call.value.isdigit():
            replay.parents[int(call.value)] = (call.pid, _clone_flags(call))
    started = not after_first_execve
    calls = 0
    skipped = 0
    for pid_or_none, body in _records(text):
        if pid_or_none is None:
            pid = replay.first_pid if replay.first_pid is not None else _UNKNOWN_PID
        else:
            pid = pid_or_none
            if replay.first_pid is None and pid not in replay.parents:
                replay.adopt_unprefixed(pid)
        call = _parse_call(pid, body)
        if call is None:
            skipped += 1
            log.debug("skipping an unparsable strace line: %.120s", body)
            continue
        calls += 1
        if not started:
            if call.name in {"execve", "execveat"} and call.value == "0":
                started = True
            else:
                continue
        replay.apply(call)
    if calls == 0:
        raise UsageError("no system calls found; expected the output of 'strace -f'")
    return replay.accesses, replay.unresolved, skipped


# ----------------------------------------------------------------------------- grouping


def system_root(path: str) -> str | None:
    """Return the system root ``path`` lies under (kept in clear), or None."""
    for root in SYSTEM_ROOTS:
        if path == root or path.startswith(root + "/"):
            return root
    multiarch = _MULTIARCH.match(path)
    if multiarch:
        return multiarch.group().rstrip("/")
    if _USR_LIB_LIBRARY.match(path):
        return "/usr/lib (shared libraries)"
    return None


def directory_root(path: str) -> str | None:
    """Return the directory to protect for an accessed path, or None for files directly in /."""
    python = _PYTHON_LIB.match(path)
    if python:
        return python.group(1)
    parts = path.strip("/").split("/")
    for container in sorted(_CONTAINERS, key=len, reverse=True):
        if path.startswith(container + "/"):
            depth = container.count("/") + 1
            if len(parts) > depth:
                return "/" + "/".join(parts[:depth])
            return container  # a file straight inside the container directory
    if len(parts) > 1:
        return "/" + parts[0]
    return None


def choose_directories(accesses: Sequence[Access]) -> tuple[list[str], dict[str, int], list[str]]:
    """Group accessed paths into (directories to protect, system roots kept in clear, unplaced).

    Directories that are only looked at (a stat, a listing, a search path entry) do not make
    a root on their own: Python stats every entry of ``sys.path``, /usr/lib included, and
    that says nothing about which files it needs. Only the files under them do.
    """
    paths = {access.path for access in accesses}
    directories = {access.path for access in accesses if access.directory}
    for path in paths:
        parent = posixpath.dirname(path)
        while parent != "/":
            directories.add(parent)
            parent = posixpath.dirname(parent)
    roots: set[str] = set()
    kept: dict[str, int] = {}
    unplaced: set[str] = set()
    for path in sorted(paths):
        system = system_root(path)
        if system is not None:
            kept[system] = kept.get(system, 0) + 1
            continue
        if path in directories or path == "/":
            continue
        root = directory_root(path)
        if root is None:
            unplaced.add(path)
        else:
            roots.add(root)
    chosen: list[str] = []
    for root in sorted(roots):
        if not any(root.startswith(parent + "/") for parent in chosen):
            chosen.append(root)
    return chosen, dict(sorted(kept.items())), sorted(unplaced)


def analyze(
    text: str, *, initial_cwd: str | None = None, after_first_execve: bool = False
) -> TraceResult:
    """Parse an strace log and choose the directories to protect; see :func:`parse_strace`."""
    accesses, unresolved, skipped = parse_strace(
        text, initial_cwd=initial_cwd, after_first_execve=after_first_execve
    )
    directories, kept, unplaced = choose_directories(accesses)
    return TraceResult(directories, kept, unplaced, sorted(set(unresolved)), accesses, skipped)


# ----------------------------------------------------------------------------- recording


def _engine(command: Sequence[str], *, timeout: float = 120) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if done.returncode != 0:
        raise ImageError(f"'{' '.join(command[:3])}' failed: {done.stderr.strip()}")
    return done.stdout.strip()


def record_image_trace(
    image: str,
    command: Sequence[str] = (),
    *,
    seconds: float = 10.0,
    network: str = "none",
    engine: str = "podman",
) -> tuple[str, str]:
    """Run ``image`` under strace for up to ``seconds`` and return (strace log, working dir).

    Nothing is installed into the image. The container is created and initialised but not
    started, so its process waits in the runtime's ``init`` before it executes the command;
    the host's strace attaches to that process (``strace -f -p``) and the container is
    started only then, so the log covers the application from its first ``execve``. The
    calls before that ``execve`` are the runtime's own. This needs podman (``podman init``)
    and permission to ptrace the container's process: root, or a user allowed by
    ``kernel.yama.ptrace_scope``. The container is removed afterwards.

    Raises :class:`UsageError` when strace or the engine is missing and
    :class:`ImageError` when the container cannot be created, started or traced.
    """
    strace = shutil.which("strace")
    if strace is None:
        raise UsageError("strace is not installed on this host; install the strace package")
    if engine != "podman" or shutil.which(engine) is None:
        raise UsageError(f"tracing an image needs podman; {engine!r} is not usable here")
    workdir = _engine([engine, "image", "inspect", "--format", "{{.Config.WorkingDir}}", image])
    name = f"enclavify-trace-{uuid.uuid4().hex[:12]}"
    _engine([engine, "create", "--name", name, f"--network={network}", image, *command])
    try:
        _engine([engine, "init", name])
        pid = _engine([engine, "inspect", "--format", "{{.State.Pid}}", name])
        with tempfile.TemporaryDirectory(prefix="enclavify-trace-") as tmp:
            output = Path(tmp) / "strace.log"
            tracer = subprocess.Popen(
                [strace, "-f", "-o", str(output), "-p", pid],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            try:
                _wait_until_attached(tracer, pid)
                log.debug("strace attached to %s (pid %s); starting it", name, pid)
                _engine([engine, "start", name])
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline and tracer.poll() is None:
                    time.sleep(0.2)
            finally:
                subprocess.run([engine, "stop", "-t", "2", name], capture_output=True,
                               check=False, timeout=60)
                try:
                    tracer.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    tracer.kill()
                    tracer.wait()
            return output.read_text(errors="surrogateescape"), workdir or "/"
    finally:
        subprocess.run([engine, "rm", "-f", name], capture_output=True, check=False, timeout=60)


def _wait_until_attached(tracer: subprocess.Popen[str], pid: str) -> None:
    """Block until strace reports it has attached, so no early call goes unrecorded."""
    assert tracer.stderr is not None
    stream = tracer.stderr
    line = stream.readline()  # strace writes this notice before any traced call
    if "attached" not in line:
        tracer.kill()
        rest = line + stream.read()
        raise ImageError(
            f"strace cannot attach to the container's process {pid}: {rest.strip()} "
            "(tracing needs root or a kernel.yama.ptrace_scope that allows it)"
        )
    # Later notices (one per new process) must not fill the pipe and stall strace.
    threading.Thread(target=stream.read, daemon=True).start()
