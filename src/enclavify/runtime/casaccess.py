"""The launcher's way to the CAS: its address, its pinned certificate, and an early challenge.

Attesting takes two round trips to the CAS: a challenge (with the TLS handshake before it)
and then the evidence. The evidence needs the measurement and the launcher's modules, but
the challenge needs neither. So the entrypoint asks for it in a thread
(:class:`EarlyChallenge`) while the launcher imports the rest of its modules, and the
evidence goes out on the same connection afterwards. The early challenge is only a head
start: when it fails, the launcher asks again the usual way and reports what goes wrong.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

import _thread
import os
import posixpath

from enclavify.errors import LaunchError
from enclavify.runtime.config import CONFIG_NAME, RUNTIME_DIR, RuntimeConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from os import PathLike
    from typing import Optional

    from enclavify.cas.client import CasClient

    _PathText = str | PathLike[str]

INSECURE_CONFIG_VARIABLE = "ENCLAVIFY_INSECURE_CONFIG_FILE"
CAS_ADDRESS_VARIABLES = ("ENCLAVIFY_CAS_ADDR", "SCONE_CAS_ADDR")
CONFIG_ID_VARIABLES = ("ENCLAVIFY_CONFIG_ID", "SCONE_CONFIG_ID")


class CasSettings:
    """The CAS's address, the configuration to ask it for, and how to recognise the CAS."""

    def __init__(
        self, address: str, config_id: str, ca_pem: Optional[bytes], fingerprint: Optional[str]
    ) -> None:
        self.address = address
        self.config_id = config_id
        self.ca_pem = ca_pem
        self.fingerprint = fingerprint

    def client(self) -> CasClient:
        """Return a client for the CAS (imports the client and ssl on first use)."""
        from enclavify.cas.client import CasClient  # noqa: PLC0415

        return CasClient(self.address, ca_pem=self.ca_pem, fingerprint=self.fingerprint)


def cas_settings(
    config: RuntimeConfig, environ: Mapping[str, str], runtime_dir: _PathText = RUNTIME_DIR
) -> CasSettings:
    """Return the CAS settings from the environment and ``runtime.json``.

    Raises:
        LaunchError: the address, the configuration id or the pinned certificate is missing,
            or the certificate lies outside the runtime tree.
    """
    address = _first(environ, CAS_ADDRESS_VARIABLES) or config.cas_address
    config_id = _first(environ, CONFIG_ID_VARIABLES) or config.config_id
    if not address:
        raise LaunchError("no CAS address: set ENCLAVIFY_CAS_ADDR or convert the image with --cas")
    if not config_id:
        raise LaunchError(
            "no configuration id: set ENCLAVIFY_CONFIG_ID to <namespace/session>/<service>"
        )
    ca_pem = None
    if config.cas_certificate:
        # Only a certificate inside the runtime tree is covered by the measurement.
        pinned = posixpath.normpath(config.cas_certificate)
        if not pinned.startswith(f"{RUNTIME_DIR}/"):
            raise LaunchError(
                f"{CONFIG_NAME}: the CAS certificate {pinned!r} must lie in {RUNTIME_DIR}"
            )
        certificate = os.path.join(runtime_dir, pinned[len(f"{RUNTIME_DIR}/") :])
        try:
            with open(certificate, "rb") as stream:
                ca_pem = stream.read()
        except OSError as error:
            raise LaunchError(f"cannot read the pinned CAS certificate: {error}") from error
    if ca_pem is None and not config.cas_fingerprint:
        raise LaunchError("the image pins no CAS certificate; convert it again with --cas")
    return CasSettings(address, config_id, ca_pem, config.cas_fingerprint)


def _first(environ: Mapping[str, str], names: Sequence[str]) -> Optional[str]:
    for name in names:
        if environ.get(name):
            return environ[name]
    return None


class EarlyChallenge:
    """A challenge asked of the CAS in a thread, for the first attestation attempt.

    The thread tries to connect once; the launcher's own request retries, with backoff, only
    if this one fails. :meth:`nonce` waits for the thread, so no thread is left when the
    launcher later forks its unsealing processes.
    """

    def __init__(self, settings: CasSettings, client: CasClient) -> None:
        self.settings = settings
        self.client = client
        self._nonce: Optional[bytes] = None
        self._attempts = client.attempts
        client.attempts = 1
        self._done = _thread.allocate_lock()
        self._done.acquire()
        _thread.start_new_thread(self._ask, ())

    def _ask(self) -> None:
        try:
            self._nonce = self.client.challenge()
        except BaseException:  # noqa: S110 - the launcher asks again and reports the error
            pass
        finally:
            self._done.release()

    def nonce(self) -> Optional[bytes]:
        """Wait for the thread; return the nonce, or None when the CAS did not give one."""
        with self._done:
            self.client.attempts = self._attempts
            return self._nonce


def start_challenge(
    environ: Mapping[str, str], runtime_dir: _PathText = RUNTIME_DIR
) -> Optional[EarlyChallenge]:
    """Start asking the CAS for a challenge if the launcher is going to attest, else None.

    Anything wrong with the settings gives None here: the launcher finds it again and
    reports it in its usual order.
    """
    if environ.get(INSECURE_CONFIG_VARIABLE):
        return None
    try:
        config = RuntimeConfig.load(os.path.join(runtime_dir, CONFIG_NAME))
        settings = cas_settings(config, environ, runtime_dir)
        client = settings.client()
    except Exception:  # the launcher meets it again and reports it
        return None
    return EarlyChallenge(settings, client)
