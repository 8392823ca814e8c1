"""The confidential image's configuration and history, derived from the native image's.

What stays in the image is only what the container engine needs to start the launcher and
what the measurement depends on. The original command, environment and working directory
move into the session (through the conversion result), because anyone who has the image can
read its config, and environment variables often carry secrets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from enclavify.image import ImageConfig

LABEL_PREFIX = "org.enclavify."
LABEL_VERSION = LABEL_PREFIX + "runtime.version"
LABEL_MEASUREMENT = LABEL_PREFIX + "measurement"
LABEL_REGIONS = LABEL_PREFIX + "protected"
LABEL_PLAIN = LABEL_PREFIX + "plain"

# The only variable kept from the native Env: a shell started with `podman exec` needs it,
# and a search path is not a secret. Everything else goes to the session.
KEPT_ENV = ("PATH",)


def original_command(config: ImageConfig) -> list[str]:
    """Return what the native image runs: Entrypoint followed by Cmd."""
    return list(config.entrypoint or []) + list(config.cmd or [])


def original_environment(config: ImageConfig) -> dict[str, str]:
    """Return the native Env as a mapping; a later duplicate wins, as in the engines."""
    environment: dict[str, str] = {}
    for item in config.env:
        name, _, value = item.partition("=")
        if name:
            environment[name] = value
    return environment


def confidential_config(
    config: ImageConfig,
    *,
    entrypoint: Sequence[str],
    runtime_version: str,
    measurement: str,
    regions: Sequence[str],
    plain: Sequence[str] = (),
) -> ImageConfig:
    """Return the configuration of the confidential image.

    Entrypoint becomes the launcher and Cmd is removed. The user is root, because the launcher
    mounts the memory-backed file systems before it drops to the original user named in the
    runtime settings. The working directory is ``/`` and the Env keeps only ``PATH``.
    ExposedPorts, Volumes, StopSignal and Labels stay. Labels ``org.enclavify.*`` are added
    (and any the native image had are replaced); they carry the runtime version, the
    measurement, the protected directories' names and the ``--plain`` ones, never content.
    """
    kept_env = [item for item in config.env if item.partition("=")[0] in KEPT_ENV]
    labels = {
        name: value for name, value in config.labels.items() if not name.startswith(LABEL_PREFIX)
    }
    labels[LABEL_VERSION] = runtime_version
    labels[LABEL_MEASUREMENT] = measurement
    labels[LABEL_REGIONS] = json.dumps(list(regions))
    if plain:
        labels[LABEL_PLAIN] = json.dumps(list(plain))
    changed = config.replace(
        entrypoint=list(entrypoint),
        cmd=None,
        env=kept_env,
        # Numeric, so the engine need not read /etc/passwd, which may be protected.
        user="0:0",
        working_dir="/",
        labels=labels,
    )
    raw = changed.raw
    section = raw["config"]
    # These name native commands, which the launcher now starts instead of the engine. A
    # health check written for the native command is meaningless here and may leak it.
    for key in ("Healthcheck", "OnBuild", "Shell", "ArgsEscaped"):
        section.pop(key, None)
    for key in ("author", "comment"):
        raw.pop(key, None)
    return ImageConfig(raw)


def neutral_history(history: Sequence[dict[str, Any]], layer_count: int) -> list[dict[str, Any]]:
    """Return history entries for the rewritten original layers, with nothing of the native ones.

    ``created_by`` of a native image often spells out build commands (``RUN echo $TOKEN >
    /app/key``, ``ENV API_KEY=...``), so only the creation times survive: one neutral entry per
    layer, and none for the native image's empty-layer entries (ENV, LABEL, CMD).
    """
    times = [entry.get("created") for entry in history if not entry.get("empty_layer")]
    entries: list[dict[str, Any]] = []
    for index in range(layer_count):
        entry: dict[str, Any] = {
            "created_by": f"enclavify: native layer {index + 1} without protected directories",
        }
        if index < len(times) and isinstance(times[index], str):
            entry["created"] = times[index]
        entries.append(entry)
    return entries
