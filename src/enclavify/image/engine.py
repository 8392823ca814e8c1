"""A local container engine's image store, reached through the ``podman`` or ``docker`` CLI.

Reading exports the image to a docker archive in the work directory (``podman save
--format docker-archive`` or ``docker save``). Writing loads a docker archive with
``podman load`` or ``docker load`` and tags the loaded image with the requested name.
podman is preferred when both are installed, because a docker CLI may be present without a
running daemon.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

from enclavify.errors import ImageError
from enclavify.image.reference import ImageReference
from enclavify.image.stores import TarMembers

log = logging.getLogger(__name__)

TIMEOUT = 1800.0  # seconds; saving or loading a multi-gigabyte image takes minutes


def find_engine(preferred: str | None = None) -> str:
    """Return ``podman`` or ``docker``: ``preferred`` if given, else the first installed.

    Raises:
        ImageError: neither CLI (or not the preferred one) is installed.
    """
    candidates = [preferred] if preferred else ["podman", "docker"]
    for name in candidates:
        if shutil.which(name):
            return name
    raise ImageError(
        f"no container engine found: install {' or '.join(candidates)} to use local image names"
    )


def _run(argv: list[str], what: str) -> str:
    log.debug("running %s", " ".join(argv))
    try:
        completed = subprocess.run(
            argv, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"{what} failed: {exc}") from exc
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        raise ImageError(
            f"{what} failed: {detail[-1] if detail else f'exit {completed.returncode}'}"
        )
    return completed.stdout


def export_image(reference: ImageReference, work: Path) -> TarMembers:
    """Save an engine image into ``work`` as a docker archive and return its members.

    Raises:
        ImageError: the engine is missing, the image does not exist or saving failed.
    """
    engine = find_engine(reference.engine)
    name = reference.name
    assert name is not None
    archive = work / "engine-export.tar"
    # A docker archive contains the layers uncompressed, which is what the first pass wants
    # anyway: podman writes it in 1.5 s where an oci-archive, recompressed, takes 4.4 s for
    # a 130 MB image on a 2-core test machine.
    if engine == "podman":
        argv = ["podman", "save", "--format", "docker-archive", "-o", str(archive), name]
    else:
        argv = ["docker", "save", "-o", str(archive), name]
    _run(argv, f"{engine} save {name!r}")
    return TarMembers(archive, f"{engine} save of {name!r}")


def load_image(archive: Path, reference: ImageReference, image_id: str) -> None:
    """Load a docker-archive into the engine and tag it as ``reference``.

    Raises:
        ImageError: the engine is missing or refused the archive.
    """
    engine = find_engine(reference.engine)
    name = reference.name
    assert name is not None
    output = _run([engine, "load", "-i", str(archive)], f"{engine} load")
    loaded = re.findall(r"sha256:([0-9a-f]{64})", output)
    identifier = loaded[-1] if loaded else image_id.split(":", 1)[1]
    if identifier != image_id.split(":", 1)[1]:
        raise ImageError(f"{engine} load reported image {identifier}, expected {image_id}")
    _run([engine, "tag", identifier, name], f"{engine} tag {name!r}")
    log.debug("loaded %s into %s as %s", image_id, engine, name)
