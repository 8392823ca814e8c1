"""The one-step pipeline behind ``sconify_image``.

Steps, in order:

1. Check what can be checked before any work: the hooks parse and fit the template, the CAS
   certificate is at hand, and (unless ``dry_run``) the CAS responds over TLS with that
   certificate and the namespace exists or may be created.
2. Convert the image, with the CAS address, its certificate and the configuration id baked in.
3. Fill the session template with the conversion's values and the hooks; validate it.
4. Upload: create the namespace when asked, then create the session, or update it with the
   current hash as predecessor when it already exists. Every answer is checked.
5. Write the filled session (0600) and the compose file, atomically.

The session name ``NAMESPACE/NAME`` is returned for the caller to print.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from enclavify import atomic
from enclavify.attest import devices
from enclavify.cas.client import CasClient
from enclavify.cas.identity import load_or_create_identity
from enclavify.cas.paths import pinned_ca_certificate
from enclavify.compose import ComposeSettings, render_compose
from enclavify.convert import HEAP_RANGE, STACK_RANGE, ConvertOptions, convert_image, parse_size
from enclavify.convert.options import FSPF_PATH
from enclavify.errors import CasError, CasRejected, UsageError
from enclavify.policy import default_template, fill_template, parse_session, session_hash
from enclavify.progress import Progress, for_stream

log = logging.getLogger(__name__)

HTTP_NOT_FOUND = 404


@dataclass(frozen=True)
class SconifyOptions:
    """The options of ``sconify_image`` (see ``sconify_image --help``)."""

    source: str
    target: str
    binary: str
    name: str
    namespace: str
    dirs: tuple[str, ...] = ()
    plain: tuple[str, ...] = ()
    base: str | None = None
    heap: str = "1G"
    stack: str = "4M"
    dlopen: str = "2"
    platform: str | None = None
    cas: str = "localhost:8081"
    cas_cert: Path | None = None
    create_namespace: bool = False
    template: Path | None = None
    session_file: Path = Path("session.yml")
    service_name: str = "service"
    environment: Mapping[str, str] = field(default_factory=dict)
    command: str | None = None
    allow_debug_mode: bool = False
    attestation_mode: str = "auto"
    identity: Path | None = None
    compose_file: Path = Path("docker-compose.yml")
    result_file: Path | None = None
    dry_run: bool = False
    secrets_hook: str | None = field(default=None, repr=False)
    injected_files_hook: str | None = field(default=None, repr=False)
    show_progress: bool = True


@dataclass(frozen=True)
class ServiceValues:
    """What the conversion contributes to the session; placeholders before it has run."""

    measurement: str = "0" * 64
    command: Sequence[str] = ("true",)
    environment: Mapping[str, str] = field(default_factory=dict)
    pwd: str = "/"  # noqa: S105 - the working directory, not a password
    fspf_key: str = field(default="0" * 64, repr=False)
    fspf_tag: str = "0" * 32


def sconify(options: SconifyOptions) -> str:
    """Convert, fill the session, upload it and write the files; return ``NAMESPACE/NAME``.

    Raises:
        UsageError: an option is invalid (checked before anything is written).
        PolicyError: the template or a hook is invalid.
        CasError: the CAS cannot be reached, is not the pinned one, or refuses the upload.
        ImageError, ProtectError: the conversion failed; nothing was uploaded.
    """
    template = _read_template(options.template)
    heap = parse_size(options.heap, option="--heap", bounds=HEAP_RANGE)
    stack = parse_size(options.stack, option="--stack", bounds=STACK_RANGE)
    attestation_mode = choose_attestation_mode(options.attestation_mode)

    # Filling the template once with placeholders makes a bad hook or template fail now
    # rather than after a long conversion.
    fill_session(options, template, attestation_mode, ServiceValues())

    ca_pem = pinned_ca_certificate(options.cas_cert)
    client = None
    if not options.dry_run:
        client = CasClient(
            options.cas, ca_pem=ca_pem, identity=load_or_create_identity(options.identity)
        )
        _check_namespace(client, options)

    progress = for_stream(bars=options.show_progress)
    # The conversion result contains the fspf key, and so does the session file. Without
    # --result it exists only until the session file is written, in a private directory.
    scratch = None
    result_path = options.result_file
    if result_path is None:
        directory = _directory_of(options.session_file)
        scratch = Path(tempfile.mkdtemp(prefix=".sconify-", dir=directory))
        result_path = scratch / "result.json"
    try:
        return _convert_and_upload(
            options,
            template=template,
            attestation_mode=attestation_mode,
            ca_pem=ca_pem,
            client=client,
            progress=progress,
            result_path=result_path,
            heap=heap,
            stack=stack,
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _directory_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path()


def _convert_and_upload(
    options: SconifyOptions,
    *,
    template: str,
    attestation_mode: str,
    ca_pem: bytes,
    client: CasClient | None,
    progress: Progress,
    result_path: Path,
    heap: int,
    stack: int,
) -> str:
    session_name = f"{options.namespace}/{options.name}"
    config_id = f"{session_name}/{options.service_name}"
    result = convert_image(
        ConvertOptions(
            source=options.source,
            destination=options.target,
            binary=options.binary,
            protected=options.dirs,
            plain=options.plain,
            heap=heap,
            stack=stack,
            dlopen=int(options.dlopen),
            platform=options.platform,
            base=options.base,
            result_path=result_path,
            cas_address=options.cas,
            cas_certificate=ca_pem,
            config_id=config_id,
        ),
        progress=progress,
    )

    command = list(result.service.get("command") or [])
    if options.command is not None:
        command = shlex.split(options.command)
    if not command:
        raise UsageError(
            f"{options.source} has neither entrypoint nor command; pass --command"
        )
    values = ServiceValues(
        measurement=result.measurement,
        command=command,
        environment={**result.service.get("environment", {}), **options.environment},
        pwd=result.service.get("pwd") or "/",
        fspf_key=result.fspf_key.hex(),
        fspf_tag=result.fspf_tag.hex(),
    )
    def fill(predecessor: str | None) -> str:
        return fill_session(options, template, attestation_mode, values, predecessor)

    session_text = fill(None)
    if client is not None:
        progress.step(f"Uploading session {session_name} to {options.cas}")
        session_text = _upload(client, options, fill)

    atomic.write_bytes(options.session_file, session_text.encode(), mode=0o600)
    compose = ComposeSettings(
        service=options.service_name,
        image=options.target,
        regions=result.protected,
        cas_address=options.cas,
        config_id=config_id,
        exposed_ports=result.exposed_ports,
        devices=[device.path for device in devices.detect() if device.path.startswith("/dev/")],
    )
    atomic.write_bytes(options.compose_file, render_compose(compose).encode(), mode=0o644)
    progress.step(f"Wrote {options.session_file} and {options.compose_file}")
    return session_name


def choose_attestation_mode(requested: str) -> str:
    """Resolve ``auto`` to ``hardware`` or ``simulation``; warn whenever simulation results."""
    mode = requested
    if requested == "auto":
        mode = "hardware" if devices.detect() else "simulation"
    if mode == "simulation":
        log.warning(
            "INSECURE: the session accepts simulation evidence, which proves nothing about the "
            "host%s; use it for development only",
            " (no TEE device on this machine)" if requested == "auto" else "",
        )
    return mode


def _read_template(path: Path | None) -> str:
    if path is None:
        return default_template()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read the template {str(path)!r}: {error}") from error


def fill_session(
    options: SconifyOptions,
    template: str,
    attestation_mode: str,
    values: ServiceValues,
    predecessor: str | None = None,
) -> str:
    """Fill the template with the options, the conversion's values and the hooks."""
    return fill_template(
        template,
        name=options.name,
        namespace=options.namespace,
        service_name=options.service_name,
        image_name=options.target,
        measurement=values.measurement,
        command=values.command,
        environment=values.environment,
        pwd=values.pwd,
        fspf_path=FSPF_PATH,
        fspf_key=values.fspf_key,
        fspf_tag=values.fspf_tag,
        secrets_hook=options.secrets_hook,
        injected_files_hook=options.injected_files_hook,
        predecessor=predecessor,
        attestation_mode=attestation_mode,
        tolerate=["debug-mode"] if options.allow_debug_mode else [],
    )


def _session_exists(client: CasClient, name: str) -> bool:
    try:
        client.get_session(name)
    except CasRejected as error:
        if error.status == HTTP_NOT_FOUND:
            return False
        raise
    return True


def _check_namespace(client: CasClient, options: SconifyOptions) -> None:
    if _session_exists(client, options.namespace):
        return
    if not options.create_namespace:
        raise UsageError(
            f"namespace {options.namespace!r} does not exist on the CAS at {options.cas}; "
            "pass --create-namespace"
        )


def namespace_session(namespace: str) -> str:
    """Return the session text of a namespace that only its creator may read, change or extend."""
    return (
        f"name: {namespace}\n"
        'version: "0.3"\n'
        "access_policy:\n"
        "  read: [CREATOR]\n"
        "  update: [CREATOR]\n"
        "  create_sessions: [CREATOR]\n"
    )


def _upload(
    client: CasClient, options: SconifyOptions, fill: Callable[[str | None], str]
) -> str:
    """Create the namespace if asked, then create or update the session; return what was sent.

    ``fill(predecessor)`` returns the session text with that predecessor.
    """
    if options.create_namespace and not _session_exists(client, options.namespace):
        client.create_session(namespace_session(options.namespace))
        log.info("created namespace %s", options.namespace)

    session_name = f"{options.namespace}/{options.name}"
    if _session_exists(client, session_name):
        current = str(client.get_session(session_name)["hash"])
        session_text = fill(current)
        stored_hash = client.update_session(session_text)
        log.info("updated session %s (%s -> %s)", session_name, current, stored_hash)
    else:
        session_text = fill(None)
        stored_hash = client.create_session(session_text)
        log.info("created session %s (%s)", session_name, stored_hash)

    # The CAS returns the hash of what it stored; a mismatch means it stored something else.
    expected = session_hash(parse_session(session_text))
    if stored_hash != expected:
        raise CasError(
            f"the CAS stored session {session_name} with hash {stored_hash}, "
            f"but the uploaded session hashes to {expected}"
        )
    return session_text
