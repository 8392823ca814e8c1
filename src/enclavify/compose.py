"""Compose files for confidential images.

A confidential image needs more from its container engine than the native one: a memory-backed
mount at each protected directory (the launcher decrypts into it), the TEE device when the host
has one, and a way to reach the CAS. This module writes that down as a compose file that
``docker compose``, ``podman compose`` and podman-compose all read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

# Loopback CAS addresses are only reachable from a container that shares the host's network.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True)
class ComposeSettings:
    """What the compose file needs to know about one converted image."""

    service: str
    image: str
    regions: Sequence[str]
    cas_address: str
    config_id: str
    exposed_ports: Sequence[str] = ()
    devices: Sequence[str] = ()
    tmpfs_size: str | None = None
    extra_environment: Mapping[str, str] = field(default_factory=dict)


def is_loopback_address(address: str) -> bool:
    """Tell whether ``host[:port]`` names this machine's loopback interface."""
    host = split_host(address)
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(address: str) -> str:
    """Return the host part of ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if address.startswith("["):
        return address[1 : address.index("]")]
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address


def compose_document(settings: ComposeSettings) -> dict[str, Any]:
    """Build the compose document for one confidential service."""
    tmpfs_options = "mode=0755"
    if settings.tmpfs_size:
        tmpfs_options += f",size={settings.tmpfs_size}"

    service: dict[str, Any] = {
        "image": settings.image,
        "environment": {
            "ENCLAVIFY_CAS_ADDR": settings.cas_address,
            "ENCLAVIFY_CONFIG_ID": settings.config_id,
            **dict(settings.extra_environment),
        },
        # Each protected directory is decrypted into memory, never onto the host's disk.
        "tmpfs": [f"{region}:{tmpfs_options}" for region in settings.regions],
    }
    if settings.devices:
        service["devices"] = list(settings.devices)

    if is_loopback_address(settings.cas_address):
        # A CAS on the host's loopback interface is reachable only from the host's network
        # namespace; published ports are then implicit.
        service["network_mode"] = "host"
    elif settings.exposed_ports:
        numbers = [port.split("/", 1)[0] for port in settings.exposed_ports]
        service["ports"] = [f"127.0.0.1:{number}:{number}" for number in numbers]

    return {"services": {settings.service: service}}


def render_compose(settings: ComposeSettings) -> str:
    """Render the compose file text."""
    header = (
        "# Written by sconify_image. The container decrypts its protected directories into\n"
        "# the tmpfs mounts below after the CAS has verified it.\n"
    )
    return header + yaml.safe_dump(compose_document(settings), sort_keys=False)
