"""``enclavify image inspect``: what an image protects, which runtime it carries, its measurement.

The measurement is recomputed from the image's files (the runtime tree, the binary, the fspf
and the settings in ``runtime.json``), the same way the launcher does at start, and compared
with the one the converter wrote into the image's labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclavify.attest import measurement
from enclavify.errors import Error, ImageError
from enclavify.image import MergedFilesystem, open_image

from .imageconfig import LABEL_MEASUREMENT, LABEL_PLAIN, LABEL_REGIONS, LABEL_VERSION
from .options import FSPF_PATH, PACK_PATH, RUNTIME_DIR
from .runtimelayer import SETTINGS_NAME


@dataclass(frozen=True)
class Inspection:
    """Report of :func:`inspect_image`.

    Fields other than ``confidential`` are empty for a native image. ``problems`` lists the
    inconsistencies found in a confidential one.
    """

    image: str
    confidential: bool
    platform: str
    regions: list[str] = field(default_factory=list)
    plain: list[str] = field(default_factory=list)
    protected_bytes: int = 0
    runtime_version: str | None = None
    interpreter: dict[str, Any] = field(default_factory=dict)
    measurement: str | None = None
    measurement_recomputed: str | None = None
    binary: str | None = None
    heap: int | None = None
    stack: int | None = None
    dlopen: int | None = None
    cas_address: str | None = None
    cas_fingerprint: str | None = None
    config_id: str | None = None
    user: str | None = None
    entrypoint: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "confidential": self.confidential,
            "platform": self.platform,
            "protected": self.regions,
            "plain": self.plain,
            "protected_bytes": self.protected_bytes,
            "runtime": {"version": self.runtime_version, "interpreter": self.interpreter},
            "measurement": self.measurement,
            "measurement_recomputed": self.measurement_recomputed,
            "measurement_matches": (
                self.measurement is not None and self.measurement == self.measurement_recomputed
            ),
            "binary": self.binary,
            "heap": self.heap,
            "stack": self.stack,
            "dlopen": self.dlopen,
            "cas_address": self.cas_address,
            "cas_fingerprint": self.cas_fingerprint,
            "config_id": self.config_id,
            "user": self.user,
            "entrypoint": self.entrypoint,
            "problems": self.problems,
        }


def inspect_image(
    reference: str, *, platform: str | None = None, temp_dir: Path | None = None
) -> Inspection:
    """Open ``reference`` and report on its confidential parts.

    A native image is not an error: the result has ``confidential=False``.

    Raises:
        ImageError: the image cannot be read.
    """
    with tempfile.TemporaryDirectory(prefix="enclavify-inspect-", dir=temp_dir) as scratch:
        work = Path(scratch)
        with open_image(reference, platform=platform, workdir=work / "image") as image:
            files = image.filesystem()
            labels = image.config.labels
            has_fspf = files.entry(FSPF_PATH) is not None
            has_settings = files.entry(f"{RUNTIME_DIR}/{SETTINGS_NAME}") is not None
            if not has_fspf and not has_settings:
                return Inspection(
                    image=reference, confidential=False, platform=str(image.platform)
                )
            return _inspect_confidential(
                reference,
                platform=str(image.platform),
                files=files,
                labels=labels,
                entrypoint=image.config.entrypoint,
                work=work,
            )


def _inspect_confidential(
    reference: str,
    *,
    platform: str,
    files: MergedFilesystem,
    labels: dict[str, str],
    entrypoint: list[str] | None,
    work: Path,
) -> Inspection:
    problems: list[str] = []
    settings: dict[str, Any] = {}
    settings_path = f"{RUNTIME_DIR}/{SETTINGS_NAME}"
    if files.entry(settings_path) is None:
        problems.append(f"{settings_path} is missing")
    else:
        try:
            loaded = json.loads(files.read_bytes(settings_path))
        except ValueError as error:
            problems.append(f"{settings_path} is not valid JSON: {error}")
        else:
            if isinstance(loaded, dict):
                settings = loaded
            else:
                problems.append(f"{settings_path} is not a JSON object")
    if files.entry(FSPF_PATH) is None:
        problems.append(f"{FSPF_PATH} is missing")

    regions = [str(item) for item in settings.get("regions") or []]
    label_regions = labels.get(LABEL_REGIONS)
    if label_regions is not None and json.loads(label_regions) != regions:
        problems.append(
            f"label {LABEL_REGIONS} ({label_regions}) differs from {settings_path} ({regions})"
        )
    pack = files.entry(PACK_PATH)
    if pack is None:
        problems.append(f"{PACK_PATH} is missing")

    recomputed = None
    if settings and files.entry(FSPF_PATH) is not None:
        try:
            recomputed = _recompute_measurement(files, settings, regions, work / "runtime")
        except (Error, OSError, KeyError, TypeError, ValueError) as error:
            problems.append(f"the measurement cannot be recomputed: {error}")
    label_measurement = labels.get(LABEL_MEASUREMENT)
    if recomputed is not None and label_measurement is not None and recomputed != label_measurement:
        problems.append(
            f"label {LABEL_MEASUREMENT} {label_measurement} differs from the measurement of "
            f"the image's files {recomputed}"
        )

    interpreter = settings.get("interpreter")
    return Inspection(
        image=reference,
        confidential=True,
        platform=platform,
        regions=regions,
        plain=[str(item) for item in json.loads(labels.get(LABEL_PLAIN, "[]"))],
        protected_bytes=pack.size if pack is not None else 0,
        runtime_version=settings.get("runtime_version") or labels.get(LABEL_VERSION),
        interpreter=interpreter if isinstance(interpreter, dict) else {},
        measurement=label_measurement,
        measurement_recomputed=recomputed,
        binary=settings.get("binary"),
        heap=settings.get("heap"),
        stack=settings.get("stack"),
        dlopen=settings.get("dlopen"),
        cas_address=settings.get("cas_address"),
        cas_fingerprint=settings.get("cas_fingerprint"),
        config_id=settings.get("config_id"),
        user=settings.get("user"),
        entrypoint=list(entrypoint or []),
        problems=problems,
    )


def _recompute_measurement(
    files: MergedFilesystem, settings: dict[str, Any], regions: list[str], target: Path
) -> str:
    _extract(files, RUNTIME_DIR, target)
    try:
        runtime_digest = measurement.runtime_digest(target)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    binary = str(settings["binary"])
    return measurement.compute(
        runtime_digest=runtime_digest,
        binary=binary,
        binary_digest=measurement.binary_digest(files, binary, regions),
        fspf_digest=hashlib.sha256(files.read_bytes(FSPF_PATH)).hexdigest(),
        heap=int(settings["heap"]),
        stack=int(settings["stack"]),
        dlopen=int(settings["dlopen"]),
    )


def _extract(files: MergedFilesystem, top: str, target: Path) -> None:
    """Copy the tree ``top`` of the image to ``target`` with its permission bits."""
    target.mkdir(parents=True)
    directories: list[tuple[Path, int]] = []
    for entry in files.walk(top):
        relative = entry.path[len(top) :].lstrip("/")
        host = target / relative if relative else target
        if entry.type == "dir":
            host.mkdir(exist_ok=True)
            directories.append((host, stat.S_IMODE(entry.mode)))
        elif entry.type == "symlink":
            os.symlink(entry.linkname, host)
        elif entry.type in ("file", "hardlink"):
            with files.open(entry.path) as source, open(host, "wb") as sink:
                shutil.copyfileobj(source, sink)
            os.chmod(host, stat.S_IMODE(entry.mode))
        else:
            raise ImageError(f"{entry.path!r} in {top} is a {entry.type}")
    # Directory modes last, so a read-only directory does not stop its own extraction.
    for host, mode in reversed(directories):
        os.chmod(host, mode)
