"""Helpers for the sconify_image tests: the example's hooks and flags, compose to podman.

Used by test_sconify.py, test_confidential_run.py and test_compose.py. Everything runs on
127.0.0.1: the CAS (started with tests.cas_process) listens on an ephemeral port with its own
TLS certificate.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.cas_process import CasProcess

TOP = Path(__file__).resolve().parent.parent
FLASK_EXAMPLE = TOP / "examples" / "flask-restapi"
# The installed console script when there is one, as users run it.
_SCRIPT = Path(sys.executable).parent / "sconify_image"
SCONIFY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "enclavify.cli.sconify"]
# The Debian base image's layout: the standard library, Debian's Python packages, the app.
FLASK_DIRS = ("/home", "/usr/local/lib", "/app", "/usr/lib/python3", "/usr/lib/python3.11",
              "/tls")
FLASK_BINARY = "/usr/bin/python3"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """Tell whether nothing listens on 127.0.0.1:port (closed connections may linger)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for_free_port(port: int, seconds: float = 90) -> bool:
    """Wait until nothing listens on 127.0.0.1:port; False if something still does."""
    deadline = time.monotonic() + seconds
    while not port_is_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def example_hooks() -> dict[str, str]:
    """SECRETS and INJECTED_FILES exactly as examples/flask-restapi/hooks.sh exports them."""
    done = subprocess.run(
        ["bash", "-c", 'source "$1" && printf "%s\\0%s" "$SECRETS" "$INJECTED_FILES"', "hooks",
         str(FLASK_EXAMPLE / "hooks.sh")],
        capture_output=True, text=True, timeout=30, check=True,
    )
    secrets_hook, injected = done.stdout.split("\0")
    return {"SECRETS": secrets_hook, "INJECTED_FILES": injected}


def sconify_environment(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for sconify_image: no TTY, hooks unset, a private config home."""
    environment = {
        key: value for key, value in os.environ.items()
        if key not in {"SECRETS", "INJECTED_FILES", "ENCLAVIFY_CAS_CERT", "ENCLAVIFY_CAS_ADDR"}
    }
    environment["XDG_CONFIG_HOME"] = str(home / "config")
    environment["HOME"] = str(home)
    environment.update(extra or {})
    return environment


def run_sconify(
    arguments: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run sconify_image with stdin closed (no TTY) and capture stdout and stderr apart."""
    return subprocess.run(
        [*SCONIFY, *arguments], cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def flask_arguments(
    *, source: str, target: str, cas: CasProcess, namespace: str, name: str = "flask",
    identity: Path, extra: Sequence[str] = (),
) -> list[str]:
    """The walk-through's sconify_image flags for the Flask example, dirs for Debian."""
    return [
        f"--namespace={namespace}", "--create-namespace", f"--name={name}",
        f"--from={source}", f"--to={target}", f"--cas={cas.address}",
        f"--cas-cert={cas.certificate}", f"--identity={identity}",
        *(f"--dir={directory}" for directory in FLASK_DIRS),
        "--heap=1G", "--stack=4M", "--dlopen=2", f"--binary={FLASK_BINARY}", *extra,
    ]


def compose_service(compose_file: Path) -> tuple[str, dict[str, Any]]:
    """The one service of a compose file sconify_image wrote: (name, definition)."""
    document = yaml.safe_load(compose_file.read_text())
    ((name, service),) = document["services"].items()
    return name, service


def podman_run_arguments(service: Mapping[str, Any]) -> list[str]:
    """What ``podman run`` needs to run a compose service: network, tmpfs, devices, env."""
    arguments: list[str] = []
    if service.get("network_mode"):
        arguments += ["--network", service["network_mode"]]
    for mount in service.get("tmpfs", []):
        arguments += ["--tmpfs", mount]
    for device in service.get("devices", []):
        arguments += ["--device", device]
    for key, value in (service.get("environment") or {}).items():
        arguments += ["-e", f"{key}={value}"]
    for port in service.get("ports", []):
        arguments += ["-p", port]
    return arguments


def remove_images(podman: str, *names: str) -> None:
    subprocess.run([podman, "rmi", "-f", *names], capture_output=True, timeout=120, check=False)


def remove_containers(podman: str, *names: str) -> None:
    subprocess.run([podman, "rm", "-f", "-t", "2", *names], capture_output=True, timeout=120,
                   check=False)
