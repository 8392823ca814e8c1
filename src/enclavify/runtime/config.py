"""``/opt/enclavify/runtime.json``: the launcher's settings baked into a confidential image.

Everything in this file is part of the measurement (it lies in the runtime tree), so it holds
only settings that are fixed per image: no keys, no per-run values. The CAS address and the
configuration id can be overridden at run time through the environment; the pinned CAS
certificate cannot.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

import os

from enclavify import jsontext
from enclavify.errors import LaunchError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from os import PathLike
    from typing import Any, Dict, List, Optional

    # Paths are plain strings here: pathlib costs about 3 ms at every container start.
    _PathText = str | PathLike[str]

RUNTIME_DIR = "/opt/enclavify"
CONFIG_NAME = "runtime.json"
CONFIG_FORMAT = 1


class RuntimeConfig:
    """The launcher's settings; sizes are in bytes, paths are absolute paths in the image.

    ``user`` is the image's original ``User`` (``name``, ``uid``, ``name:group`` or
    ``uid:gid``; empty for root). ``cas_certificate`` is the path of the pinned CAS CA
    certificate inside the image and ``cas_fingerprint`` its SHA-256 fingerprint.
    ``interpreter`` records where the carried interpreter came from.

    A plain class rather than a dataclass: the launcher imports this module at every
    container start, and the dataclasses module with its class set-up costs several ms there.
    """

    # The JSON keys, which are also the constructor's keyword arguments.
    FIELDS = (
        "binary", "heap", "stack", "dlopen", "regions", "fspf_path", "cas_address",
        "cas_certificate", "cas_fingerprint", "config_id", "user", "allow_simulation",
        "runtime_version", "interpreter", "format",
    )

    def __init__(
        self,
        *,
        binary: str,
        heap: int,
        stack: int,
        dlopen: int,
        regions: Optional[List[str]] = None,
        fspf_path: str = "/.enclavify/fspf",
        cas_address: Optional[str] = None,
        cas_certificate: Optional[str] = None,
        cas_fingerprint: Optional[str] = None,
        config_id: Optional[str] = None,
        user: str = "",
        allow_simulation: bool = True,
        runtime_version: str = "",
        interpreter: Optional[Dict[str, Any]] = None,
        format: int = CONFIG_FORMAT,
    ) -> None:
        self.binary = binary
        self.heap = heap
        self.stack = stack
        self.dlopen = dlopen
        self.regions: List[str] = list(regions) if regions is not None else []
        self.fspf_path = fspf_path
        self.cas_address = cas_address
        self.cas_certificate = cas_certificate
        self.cas_fingerprint = cas_fingerprint
        self.config_id = config_id
        self.user = user
        self.allow_simulation = allow_simulation
        self.runtime_version = runtime_version
        self.interpreter: Dict[str, Any] = dict(interpreter) if interpreter is not None else {}
        self.format = format

    def to_json(self) -> Dict[str, Any]:
        data = {name: getattr(self, name) for name in self.FIELDS}
        data.update(regions=list(self.regions), interpreter=dict(self.interpreter))
        return data

    def __repr__(self) -> str:
        return f"RuntimeConfig(binary={self.binary!r}, regions={self.regions!r})"

    @classmethod
    def from_json(cls, data: Any) -> RuntimeConfig:
        """Build a config from parsed JSON; raises LaunchError on a malformed document."""
        if not isinstance(data, dict):
            raise LaunchError(f"{CONFIG_NAME}: expected a JSON object")
        if data.get("format") != CONFIG_FORMAT:
            raise LaunchError(
                f"{CONFIG_NAME}: unsupported format {data.get('format')!r}, "
                f"expected {CONFIG_FORMAT}"
            )
        known = set(cls.FIELDS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise LaunchError(f"{CONFIG_NAME}: unknown keys {unknown}")
        for name in ("binary", "heap", "stack", "dlopen"):
            if name not in data:
                raise LaunchError(f"{CONFIG_NAME}: missing key {name!r}")
        try:
            config = cls(**data)
        except TypeError as error:
            raise LaunchError(f"{CONFIG_NAME}: {error}") from error
        _check_types(config)
        return config

    @classmethod
    def load(cls, path: _PathText) -> RuntimeConfig:
        """Read the config at ``path``; raises LaunchError when missing or invalid."""
        try:
            with open(path, "rb") as stream:
                # jsontext rather than json, because the measuring child reads this file too
                # and importing json costs it several ms (see enclavify.jsontext).
                data = jsontext.loads(stream.read().decode("utf-8"))
        except FileNotFoundError as error:
            raise LaunchError(f"runtime settings {os.fspath(path)!r} not found") from error
        except (OSError, ValueError) as error:
            raise LaunchError(
                f"cannot read runtime settings {os.fspath(path)!r}: {error}"
            ) from error
        return cls.from_json(data)

    def write(self, path: _PathText) -> None:
        """Write the config to ``path`` atomically (mode 0644, sorted keys)."""
        import json  # noqa: PLC0415 - written at conversion, never in an image

        text = json.dumps(self.to_json(), sort_keys=True, indent=2) + "\n"
        directory = os.path.dirname(os.fspath(path))
        temporary = os.path.join(directory, f".runtime-{os.urandom(8).hex()}.json")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise


def _check_types(config: RuntimeConfig) -> None:
    if not isinstance(config.binary, str) or not config.binary.startswith("/"):
        raise LaunchError(f"{CONFIG_NAME}: binary must be an absolute path")
    for name in ("heap", "stack", "dlopen"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise LaunchError(f"{CONFIG_NAME}: {name} must be an integer")
    if not isinstance(config.regions, list) or not all(
        isinstance(r, str) and r.startswith("/") for r in config.regions
    ):
        raise LaunchError(f"{CONFIG_NAME}: regions must be a list of absolute paths")
    if not isinstance(config.user, str):
        raise LaunchError(f"{CONFIG_NAME}: user must be a string")
