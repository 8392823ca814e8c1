"""The runtime cache in a conversion: same runtime layer and measurement with or without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from enclavify.attest import measurement
from enclavify.convert import inspect_image, runtimelayer
from enclavify.image import open_image

pytestmark = [pytest.mark.podman, pytest.mark.slow]

SETTINGS = runtimelayer.RuntimeSettings(
    binary="/usr/bin/python3",
    heap=1 << 30,
    stack=4 << 20,
    dlopen=1,
    regions=("/app",),
    plain=(),
    cas_address="127.0.0.1:8081",
    cas_certificate=None,
    cas_fingerprint=None,
    config_id="ns/session/service",
    user="app",
)


def _measure(built: runtimelayer.BuiltRuntime) -> str:
    return measurement.compute(
        runtime_digest=measurement.runtime_digest(built.root),
        binary=SETTINGS.binary,
        binary_digest="ab" * 32,
        fspf_digest="cd" * 32,
        heap=SETTINGS.heap,
        stack=SETTINGS.stack,
        dlopen=SETTINGS.dlopen,
    )


def test_measurement_same_with_cache(
    app_archive: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    with open_image(f"oci-archive:{app_archive}:app", workdir=tmp_path / "source") as image:
        files = image.filesystem()
        plain = runtimelayer.build(
            files, tmp_path / "plain", settings=SETTINGS, source="the image itself"
        )
        filled = runtimelayer.build(
            files, tmp_path / "filled", settings=SETTINGS, source="the image itself",
            cache_dir=cache_dir,
        )
        used = runtimelayer.build(
            files, tmp_path / "used", settings=SETTINGS, source="the image itself",
            cache_dir=cache_dir,
        )
    assert (plain.cached, filled.cached, used.cached) == (False, False, True)
    assert _measure(plain) == _measure(filled) == _measure(used)
    # With or without the cache's listing, the digest must be that of the tree on disk.
    for built in (plain, filled, used):
        assert built.digest == measurement.runtime_digest(built.root)
    assert plain.info == filled.info == used.info
    for name in ("runtime.json", "bin/python3"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "used" / name).read_bytes()


def _runtime_layer(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    layer: str = manifest["layers"][-1]["digest"]
    return layer


def _convert(archive: Path, layout: Path, cache_home: Path, *extra: str) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    env.pop("ENCLAVIFY_NO_RUNTIME_CACHE", None)
    process = subprocess.run(
        [
            sys.executable, "-m", "enclavify", "-vv", "image", "convert", "-q",
            "--from", f"oci-archive:{archive}:app", "--to", f"oci:{layout}:conf",
            "--binary", "/usr/bin/python3", "--dir", "/app", "--dlopen", "1",
            "--result", str(layout.parent / f"{layout.name}.json"), *extra,
        ],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert process.returncode == 0, process.stderr[-3000:]


def test_cli_conversions_share_one_runtime_layer(app_archive: Path, tmp_path: Path) -> None:
    cache_home = tmp_path / "xdg"
    _convert(app_archive, tmp_path / "cold", cache_home)
    entries = list((cache_home / "enclavify" / "runtime").iterdir())
    assert len([e for e in entries if len(e.name) == 64]) == 1
    _convert(app_archive, tmp_path / "warm", cache_home)
    bypass_home = tmp_path / "xdg-bypass"
    _convert(app_archive, tmp_path / "bypass", bypass_home, "--no-runtime-cache")

    # The runtime layer contains runtime.json too, so equal blobs mean an equal runtime tree.
    layers = {_runtime_layer(tmp_path / name) for name in ("cold", "warm", "bypass")}
    assert len(layers) == 1
    assert not bypass_home.exists()
    inspection = inspect_image(f"oci:{tmp_path / 'warm'}:conf", temp_dir=tmp_path)
    assert inspection.problems == []
    assert inspection.measurement_recomputed == inspection.measurement
    assert inspection.interpreter["source"] == "the image itself"
    assert inspection.interpreter["path"] == "/usr/bin/python3.11"


def test_environment_variable_bypasses_the_cache(app_archive: Path, tmp_path: Path) -> None:
    cache_home = tmp_path / "xdg"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "ENCLAVIFY_NO_RUNTIME_CACHE": "1"}
    process = subprocess.run(
        [
            sys.executable, "-m", "enclavify", "image", "convert", "-q",
            "--from", f"oci-archive:{app_archive}:app", "--to", f"oci:{tmp_path}/out:conf",
            "--binary", "/usr/bin/python3", "--dir", "/app", "--dlopen", "1",
            "--result", str(tmp_path / "result.json"),
        ],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert not cache_home.exists()
