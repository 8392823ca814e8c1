"""The OCI data model: media types, descriptors, platforms and the image configuration."""

from __future__ import annotations

import copy
import hashlib
import json
import platform as host_platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from enclavify.errors import ImageError, UsageError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = (OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP, DOCKER_LAYER)

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    """Return the ``sha256:HEX`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: object, where: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise ImageError.

    Digests become file names in layouts and the work directory, so one that is not exactly
    ``sha256:`` and 64 hex digits is rejected before it is used as a path.
    """
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ImageError(f"{where}: invalid or unsupported digest {digest!r}")
    return digest


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` as compact JSON with sorted keys (stable digests for what we write)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def load_json(data: bytes, where: str) -> dict[str, Any]:
    """Parse a JSON object, raising ImageError that names ``where`` if it is not one."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{where}: invalid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ImageError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Platform:
    """An OCI platform: ``os``/``architecture`` with an optional ``variant``."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]`` such as ``linux/amd64`` or ``linux/arm64/v8``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        """Return the platform of this machine, in OCI names."""
        machine = host_platform.machine().lower()
        names = {
            "x86_64": ("amd64", None),
            "amd64": ("amd64", None),
            "aarch64": ("arm64", None),
            "arm64": ("arm64", None),
            "armv7l": ("arm", "v7"),
            "armv6l": ("arm", "v6"),
            "i686": ("386", None),
            "i386": ("386", None),
            "ppc64le": ("ppc64le", None),
            "s390x": ("s390x", None),
            "riscv64": ("riscv64", None),
        }
        architecture, variant = names.get(machine, (machine, None))
        return cls("linux", architecture, variant)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Platform:
        return cls(
            str(value.get("os", "")),
            str(value.get("architecture", "")),
            str(value["variant"]) if value.get("variant") else None,
        )

    def matches(self, other: Platform) -> bool:
        """Return whether ``other`` (an index entry) satisfies this wanted platform.

        A wanted platform without a variant accepts any variant, and ``arm64`` treats a
        missing variant and ``v8`` as the same.
        """
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if self.variant is None:
            return True
        mine, theirs = self.variant, other.variant
        if self.architecture == "arm64":
            mine, theirs = mine or "v8", theirs or "v8"
        return mine == theirs

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


# ImageConfig.replace() keyword -> key in the OCI config's "config" object.
_CONFIG_KEYS = {
    "env": "Env",
    "cmd": "Cmd",
    "entrypoint": "Entrypoint",
    "working_dir": "WorkingDir",
    "user": "User",
    "exposed_ports": "ExposedPorts",
    "labels": "Labels",
    "stop_signal": "StopSignal",
    "volumes": "Volumes",
}


class ImageConfig:
    """An OCI image configuration (the config blob), read-only; :meth:`replace` makes a copy."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw: dict[str, Any] = copy.deepcopy(dict(raw))
        section = self._raw.get("config")
        if section is None:
            section = {}
            self._raw["config"] = section
        if not isinstance(section, dict):
            raise ImageError("image config: 'config' is not a JSON object")

    @property
    def raw(self) -> dict[str, Any]:
        """A copy of the whole config JSON."""
        return copy.deepcopy(self._raw)

    def _get(self, key: str) -> Any:
        return self._raw["config"].get(key)

    @property
    def env(self) -> list[str]:
        return list(self._get("Env") or [])

    @property
    def cmd(self) -> list[str] | None:
        value = self._get("Cmd")
        return list(value) if value is not None else None

    @property
    def entrypoint(self) -> list[str] | None:
        value = self._get("Entrypoint")
        return list(value) if value is not None else None

    @property
    def working_dir(self) -> str:
        return str(self._get("WorkingDir") or "")

    @property
    def user(self) -> str:
        return str(self._get("User") or "")

    @property
    def exposed_ports(self) -> list[str]:
        return sorted(self._get("ExposedPorts") or {})

    @property
    def labels(self) -> dict[str, str]:
        return dict(self._get("Labels") or {})

    @property
    def platform(self) -> Platform:
        return Platform.from_json(self._raw)

    @property
    def diff_ids(self) -> list[str]:
        rootfs = self._raw.get("rootfs") or {}
        return list(rootfs.get("diff_ids") or [])

    @property
    def history(self) -> list[dict[str, Any]]:
        return copy.deepcopy(list(self._raw.get("history") or []))

    def replace(self, **changes: Any) -> ImageConfig:
        """Return a copy with the given settings changed.

        Keywords: ``env`` (list of ``NAME=value``), ``cmd``, ``entrypoint`` (lists or
        ``None``), ``working_dir``, ``user``, ``exposed_ports`` (list like ``["5000/tcp"]``),
        ``labels`` (dict), ``stop_signal``, ``volumes`` (list of paths), and ``raw_changes``
        (a dict merged into the top level, e.g. ``{"created": ...}``). ``None`` removes a
        setting.
        """
        raw = copy.deepcopy(self._raw)
        section = raw["config"]
        top_level = changes.pop("raw_changes", None) or {}
        for name, value in changes.items():
            if name not in _CONFIG_KEYS:
                raise TypeError(f"ImageConfig.replace() got an unknown setting {name!r}")
            key = _CONFIG_KEYS[name]
            if value is None:
                section.pop(key, None)
            elif name in ("exposed_ports", "volumes"):
                section[key] = {str(item): {} for item in value}
            elif name == "labels":
                section[key] = {str(k): str(v) for k, v in dict(value).items()}
            elif name in ("env", "cmd", "entrypoint"):
                section[key] = [str(item) for item in value]
            else:
                section[key] = str(value)
        for key, value in dict(top_level).items():
            if value is None:
                raw.pop(key, None)
            else:
                raw[key] = copy.deepcopy(value)
        return ImageConfig(raw)

    def __repr__(self) -> str:
        return (
            f"ImageConfig(platform={self.platform}, entrypoint={self.entrypoint!r}, "
            f"cmd={self.cmd!r})"
        )
