"""The launcher: the entrypoint of a confidential image.

It runs under the interpreter carried in ``/opt/enclavify`` and, in order:

1. reads ``/opt/enclavify/runtime.json`` and computes the measurement from what is on disk;
2. gets the service's configuration: from the CAS after attesting (the normal path), or
   from the file named by ``ENCLAVIFY_INSECURE_CONFIG_FILE`` (a debugging aid that logs a
   warning on every use);
3. makes sure every protected region is a memory-backed mount and decrypts the protected
   file system into them;
4. writes the injected files (memory-backed mounts only);
5. drops to the image's original user, changes to the working directory and replaces itself
   with the application (``execve``) using exactly the configuration's environment, so the
   application receives the container's signals and its exit status is the container's.

Any failure ends with a one-line error on stderr and exit status 1. Key material is never
logged, put in the environment or written outside memory-backed mounts. Warnings and errors
go to stderr; ``ENCLAVIFY_LOG_LEVEL=debug`` shows progress too.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

import os
import posixpath
import stat
import sys

from enclavify import b64, jsontext, logs
from enclavify.errors import Error, LaunchError
from enclavify.protect.unseal import unseal_tree
from enclavify.runtime import libcrypto, mounts
from enclavify.runtime.casaccess import INSECURE_CONFIG_VARIABLE, EarlyChallenge, cas_settings
from enclavify.runtime.config import CONFIG_NAME, RUNTIME_DIR, RuntimeConfig
from enclavify.runtime.measuring import PendingMeasurement, measure
from enclavify.values import Value

# typing is imported for the type checker only: importing it costs about 2 ms at each start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from os import PathLike
    from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

    # Paths are plain strings here: pathlib costs about 3 ms at every container start.
    _PathText = str | PathLike[str]

log = logs.get_logger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_INJECTION_MODE = 0o600


class InjectionFile(Value):
    """A file the configuration lists for writing before the application starts."""

    __slots__ = ("content", "mode", "path")
    HIDDEN = ("content",)  # it may be a key

    def __init__(self, path: str, content: bytes, mode: int) -> None:
        self.path = path
        self.content = content
        self.mode = mode


class Configuration(Value):
    """Configuration the CAS releases for one service. ``fspf_key`` and ``fspf_tag`` are secrets."""

    __slots__ = ("command", "environment", "fspf_key", "fspf_tag", "injection_files", "pwd")
    # Keys, file contents and the environment stay out of tracebacks and logs.
    HIDDEN = ("environment", "fspf_key", "fspf_tag", "injection_files")

    def __init__(
        self,
        *,
        command: List[str],
        environment: Dict[str, str],
        pwd: str,
        fspf_key: Optional[bytes],
        fspf_tag: Optional[bytes],
        injection_files: List[InjectionFile],
    ) -> None:
        self.command = command
        self.environment = environment
        self.pwd = pwd
        self.fspf_key = fspf_key
        self.fspf_tag = fspf_tag
        self.injection_files = injection_files


def parse_configuration(data: Any, *, source: str) -> Configuration:
    """Validate a configuration document (the CAS's or a conversion result's).

    A conversion result keeps command, environment and working directory under ``service``;
    they are taken from there. Raises LaunchError naming the faulty field.
    """
    if not isinstance(data, dict):
        raise LaunchError(f"{source}: the configuration is not a JSON object")
    if "command" not in data and isinstance(data.get("service"), dict):
        data = dict(data, **data["service"])
    command = data.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
        raise LaunchError(f"{source}: 'command' must be a non-empty list of strings")
    environment = data.get("environment", {})
    if not isinstance(environment, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in environment.items()
    ):
        raise LaunchError(f"{source}: 'environment' must map strings to strings")
    pwd = data.get("pwd") or "/"
    if not isinstance(pwd, str) or not pwd.startswith("/"):
        raise LaunchError(f"{source}: 'pwd' must be an absolute path")
    key = _hex_field(data, "fspf_key", 32, source)
    tag = _hex_field(data, "fspf_tag", 16, source)
    files = []
    raw_files = data.get("injection_files") or []
    if not isinstance(raw_files, list):
        raise LaunchError(f"{source}: 'injection_files' must be a list")
    for index, raw in enumerate(raw_files):
        files.append(_injection_file(raw, f"{source}: injection_files[{index}]"))
    return Configuration(
        command=list(command),
        environment=dict(environment),
        pwd=pwd,
        fspf_key=key,
        fspf_tag=tag,
        injection_files=files,
    )


def _hex_field(data: Mapping[str, Any], name: str, size: int, source: str) -> Optional[bytes]:
    value = data.get(name)
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise LaunchError(f"{source}: {name!r} must be {size} bytes in hex")
    return raw


def _injection_file(raw: Any, where: str) -> InjectionFile:
    if not isinstance(raw, dict):
        raise LaunchError(f"{where}: expected an object")
    path = raw.get("path")
    if not isinstance(path, str) or not path.startswith("/") or posixpath.normpath(path) != path:
        raise LaunchError(f"{where}: 'path' must be a normalized absolute path")
    try:
        content = b64.decode(raw.get("content", ""))
    except (TypeError, ValueError) as error:
        raise LaunchError(f"{where} ({path}): 'content' is not valid base64") from error
    mode = raw.get("mode", DEFAULT_INJECTION_MODE)
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            mode = -1
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
        raise LaunchError(f"{where} ({path}): 'mode' must be a permission such as 0o600")
    return InjectionFile(path, content, mode)


def obtain_configuration(
    config: RuntimeConfig,
    measured: Callable[[], str],
    environ: Mapping[str, str],
    runtime_dir: _PathText,
    early: Optional[EarlyChallenge] = None,
) -> Configuration:
    """Get the configuration from the insecure debug file or, normally, from the CAS.

    ``measured()`` returns the measurement; it is called before the CAS's challenge is awaited.
    ``early`` is a challenge the entrypoint started asking for.
    """
    insecure = environ.get(INSECURE_CONFIG_VARIABLE)
    if insecure:
        return _insecure_configuration(insecure, measured())
    return _cas_configuration(config, measured, environ, runtime_dir, early)


def _insecure_configuration(path: str, measured: str) -> Configuration:
    log.warning(
        "INSECURE: reading the configuration and its keys from the file %s named by %s "
        "instead of attesting to a CAS; use this only for debugging",
        path,
        INSECURE_CONFIG_VARIABLE,
    )
    try:
        with open(path, "rb") as stream:
            data = jsontext.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise LaunchError(
            f"cannot read the insecure configuration file {path!r}: {error}"
        ) from error
    expected = data.get("measurement") if isinstance(data, dict) else None
    if isinstance(expected, str) and expected != measured:
        raise LaunchError(
            f"the configuration file {path!r} was made for measurement {expected}, "
            f"but this image measures {measured}"
        )
    return parse_configuration(data, source=path)


def _cas_configuration(
    config: RuntimeConfig,
    measured: Callable[[], str],
    environ: Mapping[str, str],
    runtime_dir: _PathText,
    early: Optional[EarlyChallenge],
) -> Configuration:
    settings = cas_settings(config, environ, runtime_dir)
    try:
        # Imported here so that the insecure debug path works without it.
        from enclavify.attest import producers  # noqa: PLC0415
    except ImportError as error:
        raise LaunchError(f"this runtime cannot attest: {error}") from error

    def produce(report_data: bytes) -> Tuple[str, bytes]:
        evidence_type, evidence = producers.produce_evidence(
            report_data, measurement=measured(), allow_simulation=config.allow_simulation
        )
        return str(evidence_type), bytes(evidence)

    address, config_id = settings.address, settings.config_id
    log.debug("requesting configuration %s from the CAS at %s", config_id, address)
    # Measured before waiting for the early challenge: this process hashes the binary while
    # the challenge's TLS handshake and round trip go on in their thread.
    measured()
    client, nonce = None, None
    if early is not None:
        # Wait in every case, so that no thread runs when the unsealer forks.
        early_nonce = early.nonce()
        if (early.settings.address, early.settings.config_id) == (address, config_id):
            client, nonce = early.client, early_nonce
        else:
            early.client.close()
    if client is None:
        client = settings.client()
    data = client.request_configuration(config_id, produce, nonce=nonce)
    return parse_configuration(data, source=f"CAS {address} configuration {config_id!r}")


def _inside(root: _PathText, path: str) -> str:
    """Return where the image path ``path`` lies on the host when the image's root is ``root``."""
    return os.path.join(root, path.lstrip("/"))


def unseal(config: RuntimeConfig, configuration: Configuration, root: _PathText) -> None:
    """Decrypt the protected regions into memory-backed mounts."""
    if not config.regions:
        return
    if configuration.fspf_key is None or configuration.fspf_tag is None:
        raise LaunchError(
            "the configuration has no fspf_key and fspf_tag for the protected regions"
        )
    table = mounts.MountTable()
    for region in config.regions:
        if mounts.ensure_memory_backed(_inside(root, region), table=table):
            table = mounts.MountTable()
    sealed = os.path.dirname(_inside(root, config.fspf_path))
    manifest = unseal_tree(sealed, configuration.fspf_key, configuration.fspf_tag, root)
    log.debug("decrypted %d entries", len(manifest.entries))


class User(Value):
    """The user the application runs as: uid, primary gid and every group id it belongs to."""

    __slots__ = ("gid", "groups", "uid")

    def __init__(self, uid: int, gid: int, groups: List[int]) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = groups


def resolve_user(spec: str, root: _PathText) -> User:
    """Resolve an image ``User`` (``name``, ``uid``, ``name:group``, ``uid:gid``).

    Names are looked up in the image's ``/etc/passwd`` and ``/etc/group`` directly, not
    through NSS, whose modules the carried runtime does not have.
    """
    if not spec or spec in ("root", "0", "0:0"):
        return User(0, 0, [0])
    user_part, _, group_part = spec.partition(":")
    passwd = _read_table(_inside(root, "/etc/passwd"))
    groups = _read_table(_inside(root, "/etc/group"))
    try:
        name = None
        if user_part.isdigit():
            uid = int(user_part)
            match = next((row for row in passwd if len(row) > 3 and row[2] == user_part), None)
            gid = int(match[3]) if match else uid
            name = match[0] if match else None
        else:
            match = next((row for row in passwd if row and row[0] == user_part), None)
            if match is None or len(match) < 4:
                raise LaunchError(f"user {user_part!r} not found in the image's /etc/passwd")
            name, uid, gid = match[0], int(match[2]), int(match[3])
        if group_part.isdigit():
            gid = int(group_part)
        elif group_part:
            found = next((row for row in groups if row and row[0] == group_part), None)
            if found is None or len(found) < 3:
                raise LaunchError(f"group {group_part!r} not found in the image's /etc/group")
            gid = int(found[2])
    except ValueError as error:
        raise LaunchError(
            f"invalid entry for user {spec!r} in the image's /etc/passwd or /etc/group"
        ) from error
    supplementary = [gid]
    if name is not None:
        for row in groups:
            if len(row) > 3 and name in row[3].split(",") and row[2].isdigit():
                supplementary.append(int(row[2]))
    return User(uid, gid, sorted(set(supplementary)))


def _read_table(path: str) -> List[List[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            text = stream.read()
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def write_injection_files(files: Sequence[InjectionFile], user: User, root: _PathText) -> None:
    """Write injected files; each must land on a memory-backed mount."""
    table = mounts.MountTable() if files else None
    for item in files:
        target = _inside(root, item.path)
        directory, name = os.path.split(target)
        if not mounts.is_memory_backed(directory, table=table):
            raise LaunchError(
                f"injected file {item.path!r} is not on a memory-backed file system; make its "
                f"directory a protected region or run with --tmpfs {posixpath.dirname(item.path)}"
            )
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{name}.enclavify-tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        descriptor = os.open(temporary, flags, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(item.content)
            if os.getuid() == 0:
                os.chown(temporary, user.uid, user.gid)
            os.chmod(temporary, item.mode)
            os.replace(temporary, target)
        except OSError as error:
            if os.path.lexists(temporary):
                os.unlink(temporary)
            raise LaunchError(
                f"cannot write injected file {item.path!r}: {error.strerror}"
            ) from error
        log.debug("injected %s", item.path)


def find_program(name: str, environment: Mapping[str, str], root: _PathText) -> str:
    """Resolve ``argv[0]`` like execvp does, with the configuration's PATH."""
    if "/" in name:
        candidates = [name]
    else:
        search = environment.get("PATH", DEFAULT_PATH)
        candidates = [posixpath.join(d or ".", name) for d in search.split(":")]
    for candidate in candidates:
        host = _inside(root, candidate) if candidate.startswith("/") else candidate
        try:
            info = os.stat(str(host))
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_mode & 0o111:
            return str(host)
    raise LaunchError(f"command {name!r} not found (PATH={environment.get('PATH', DEFAULT_PATH)})")


def check_binary(program: str, config: RuntimeConfig, root: _PathText) -> None:
    """Reject a program other than the measured binary."""
    measured = os.path.realpath(_inside(root, config.binary))
    if os.path.realpath(program) != measured:
        raise LaunchError(
            f"the command runs {program!r}, but the image was measured with binary "
            f"{config.binary!r}; convert it with --binary naming the program the command runs"
        )


def drop_privileges(user: User) -> None:
    """Switch to ``user``; a launcher that already runs unprivileged stays as it is."""
    if os.getuid() != 0:
        if user.uid not in (0, os.getuid()):
            raise LaunchError(f"cannot switch to uid {user.uid}: the launcher is not root")
        return
    os.setgroups(user.groups)
    os.setgid(user.gid)
    os.setuid(user.uid)


def check_loaded_libraries(
    runtime_dir: _PathText = RUNTIME_DIR, maps: str = "/proc/self/maps"
) -> None:
    """Reject shared objects mapped from outside the runtime tree.

    The loader honours ``LD_PRELOAD`` and ``/etc/ld.so.preload``, neither of which the
    measurement covers. This catches such libraries before any key is requested. A library
    that hides itself from ``/proc/self/maps`` is not caught: this is a guard against
    accidents, not a defence against code already running in the process.

    NOTE: a CAS host name is resolved through NSS, and with glibc an ``/etc/nsswitch.conf`` in
    the plain image can name further NSS modules, loaded from the image's library directories.
    The second check, before the application starts, reports them but only after the keys
    were received. A CAS address given as an IP address avoids the lookup.
    """
    try:
        with open(maps, encoding="utf-8", errors="surrogateescape") as stream:
            lines = stream.read().splitlines()
    except OSError:
        log.debug("%s is not readable; loaded libraries not checked", maps)
        return
    allowed = os.fspath(runtime_dir).rstrip("/") + "/"
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        path = fields[5]
        name = posixpath.basename(path)
        if (".so" in name) and not path.startswith(allowed):
            raise LaunchError(
                f"shared library {path!r} is loaded from outside {runtime_dir} (LD_PRELOAD "
                "or /etc/ld.so.preload?); the launcher runs only with its own libraries"
            )


def pin_libcrypto(runtime_dir: _PathText = RUNTIME_DIR) -> None:
    """Load libcrypto from the runtime tree by absolute path before any other code requests it.

    The crypto backend opens libcrypto by soname, trying ``libcrypto.so.3`` first. When the
    runtime carries another version, the loader would search the image's unmeasured library
    directories for that name. Loading the carried copy first makes every later request use it.
    """
    library_dir = os.path.join(runtime_dir, "lib")
    try:
        names = os.listdir(library_dir)
    except OSError:
        names = []
    candidates = sorted(
        os.path.join(library_dir, name) for name in names if name.startswith("libcrypto.so")
    )
    if not candidates:
        return
    try:
        libcrypto.load(candidates)
    except libcrypto.LibcryptoUnavailableError as error:
        raise LaunchError(f"cannot load the carried libcrypto: {error}") from error


def launch(
    *,
    environ: Mapping[str, str],
    runtime_dir: _PathText = RUNTIME_DIR,
    root: _PathText = "/",
    pending: Optional[PendingMeasurement] = None,
    early: Optional[EarlyChallenge] = None,
) -> None:
    """Start the application; returns only by raising.

    ``pending`` is the measurement the entrypoint started; without it one starts here.
    ``early`` is the challenge the entrypoint started asking the CAS for, if it did.
    """
    if pending is None:
        pending = PendingMeasurement(runtime_dir, root)
    try:
        config = RuntimeConfig.load(os.path.join(runtime_dir, CONFIG_NAME))
        if os.fspath(runtime_dir) == RUNTIME_DIR:
            check_loaded_libraries(runtime_dir)
            pin_libcrypto(runtime_dir)
        configuration = obtain_configuration(
            config, lambda: pending.result(config), environ, runtime_dir, early
        )
    finally:
        # Reaped in every case, so that the application never inherits the child.
        pending.close()
    log.debug("measurement %s", pending.result())
    unseal(config, configuration, root)
    user = resolve_user(config.user, root)
    write_injection_files(configuration.injection_files, user, root)
    program = find_program(configuration.command[0], configuration.environment, root)
    check_binary(program, config, root)
    if os.fspath(runtime_dir) == RUNTIME_DIR:
        check_loaded_libraries(runtime_dir)
    drop_privileges(user)
    try:
        os.chdir(_inside(root, configuration.pwd))
    except OSError as error:
        raise LaunchError(
            f"cannot change to the working directory {configuration.pwd!r}: {error.strerror}"
        ) from error
    log.debug("executing %s", program)
    try:
        os.execve(program, configuration.command, configuration.environment)  # noqa: S606
    except OSError as error:
        raise LaunchError(f"cannot execute {program!r}: {error.strerror}") from error


def main(
    argv: Optional[Sequence[str]] = None,
    pending: Optional[PendingMeasurement] = None,
    early: Optional[EarlyChallenge] = None,
) -> int:
    """Run the launcher command in ``argv``: ``run`` (the default) or ``measure``.

    ``pending`` is a measurement and ``early`` a challenge already started for ``run``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    logs.to_stderr(os.environ.get("ENCLAVIFY_LOG_LEVEL", "warning"))
    command = args[0] if args else "run"
    log.debug("launcher started: %s", command)
    try:
        if command == "run":
            launch(environ=os.environ, pending=pending, early=early)
            return 1
        if command == "measure":
            config = RuntimeConfig.load(os.path.join(RUNTIME_DIR, CONFIG_NAME))
            print(measure(config))
            return 0
        print(f"enclavify: unknown command {command!r}; use run or measure", file=sys.stderr)
        return 2
    except Error as error:
        print(f"enclavify: error: {error.diagnostics()}", file=sys.stderr)
        return 1
    except OSError as error:
        # For example a full tmpfs while decrypting; the message names the file, not its data.
        print(f"enclavify: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

