"""The session model: what a parsed, validated session contains.

Instances come from :func:`enclavify.policy.parse_session`, which checks every field; the
classes do not validate on their own. All collections are tuples or read-only mappings so a
session cannot change after its hash was computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Entries of an access policy list, besides a client key hash (64 hex digits).
CREATOR = "CREATOR"
ANY = "ANY"
NONE = "NONE"

# security.attestation.mode values.
MODE_HARDWARE = "hardware"
MODE_SIMULATION = "simulation"
MODE_NONE = "none"  # Accepted as a synonym of "simulation", for sessions written for the original.
ATTESTATION_MODES = (MODE_HARDWARE, MODE_SIMULATION, MODE_NONE)

TOLERATIONS = (
    "debug-mode",
    "hyperthreading",
    "insecure-igpu",
    "outdated-tcb",
    "software-hardening-needed",
    "insecure-configuration",
    "aepic-leak",
)

SECRET_KINDS = ("ascii", "binary", "private-key", "x509-ca", "x509")
KEY_TYPES = ("P-256", "P-384", "Ed25519", "RSA-2048", "RSA-3072")
ENDPOINTS = ("server", "client")


@dataclass(frozen=True)
class AccessPolicy:
    """Who may read the session, update it and create sessions below its name."""

    read: tuple[str, ...] = (CREATOR,)
    update: tuple[str, ...] = (CREATOR,)
    create_sessions: tuple[str, ...] = (CREATOR,)


@dataclass(frozen=True)
class ServiceAttestation:
    """Accepted measurements of a service, one list per TEE, as lower-case hex.

    ``mrenclave`` (SGX MRENCLAVE, 32 bytes) also matches simulation evidence, whose
    measurement is the launcher's own 32-byte measurement. ``mrsigner`` (SGX MRSIGNER,
    32 bytes) is an extra condition on SGX evidence when not empty. ``mrtd`` is the TDX
    MRTD (48 bytes) and ``snp_measurement`` the SEV-SNP launch MEASUREMENT (48 bytes).
    """

    mrenclave: tuple[str, ...] = ()
    mrsigner: tuple[str, ...] = ()
    mrtd: tuple[str, ...] = ()
    snp_measurement: tuple[str, ...] = ()


@dataclass(frozen=True)
class Service:
    """One program the session configures: what must run and what it is given."""

    name: str
    command: tuple[str, ...]
    image_name: str | None = None
    attestation: ServiceAttestation = field(default_factory=ServiceAttestation)
    environment: Mapping[str, str] = field(default_factory=dict)
    pwd: str = "/"  # noqa: S105 - the working directory, not a password
    fspf_path: str | None = None
    # Key material is left out of repr, so logging a session cannot leak it.
    fspf_key: str | None = field(default=None, repr=False)
    fspf_tag: str | None = None


@dataclass(frozen=True)
class InjectionFile:
    """A file the launcher writes into memory-backed storage before the program starts."""

    path: str
    content: str
    mode: int = 0o600


@dataclass(frozen=True)
class VolumeMount:
    """A session volume made available to an image at ``path``."""

    name: str
    path: str


@dataclass(frozen=True)
class Image:
    """Files and volumes given to the services that name this image."""

    name: str
    injection_files: tuple[InjectionFile, ...] = ()
    volumes: tuple[VolumeMount, ...] = ()


@dataclass(frozen=True)
class Volume:
    """A named encrypted volume with an optional explicit key and tag."""

    name: str
    fspf_key: str | None = field(default=None, repr=False)
    fspf_tag: str | None = None


@dataclass(frozen=True)
class SecretImport:
    """Take a secret's value from another session, which must export it to this one."""

    session: str
    secret: str


@dataclass(frozen=True)
class SecretDefinition:
    """One entry of ``secrets``; fields that do not apply to ``kind`` are None or empty.

    ``valid_for`` is in seconds. ``value`` is an explicit value: the string for ``ascii``,
    hex for ``binary`` and PEM for keys and certificates.
    """

    name: str
    kind: str
    value: str | None = field(default=None, repr=False)
    size: int | None = None
    key_type: str | None = None
    private_key: str | None = None
    issuer: str | None = None
    common_name: str | None = None
    dns: tuple[str, ...] = ()
    san: tuple[str, ...] = ()
    valid_for: int | None = None
    endpoint: str | None = None
    export_public: bool = False
    export: tuple[str, ...] = ()
    import_from: SecretImport | None = None


@dataclass(frozen=True)
class AttestationPolicy:
    """``security.attestation``: which evidence and which platform weaknesses are accepted.

    ``ignore_all_advisories`` is the ``"*"`` form of ``ignore_advisories``.
    """

    mode: str = MODE_HARDWARE
    tolerate: tuple[str, ...] = ()
    ignore_advisories: tuple[str, ...] = ()
    ignore_all_advisories: bool = False

    @property
    def accepts_simulation(self) -> bool:
        return self.mode in (MODE_SIMULATION, MODE_NONE)


@dataclass(frozen=True)
class Session:
    """A parsed and validated session."""

    name: str
    version: str | None = None
    predecessor: str | None = None
    access_policy: AccessPolicy = field(default_factory=AccessPolicy)
    services: tuple[Service, ...] = ()
    images: tuple[Image, ...] = ()
    volumes: tuple[Volume, ...] = ()
    secrets: tuple[SecretDefinition, ...] = ()
    attestation: AttestationPolicy = field(default_factory=AttestationPolicy)

    @property
    def namespace(self) -> str | None:
        """The enclosing namespace: everything before the last ``/``, or None at top level."""
        head, sep, _ = self.name.rpartition("/")
        return head if sep else None

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    def image(self, name: str) -> Image | None:
        return next((i for i in self.images if i.name == name), None)

    def secret(self, name: str) -> SecretDefinition | None:
        return next((s for s in self.secrets if s.name == name), None)
