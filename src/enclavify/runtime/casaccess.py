"""Launcher settings for the CAS connection, and a challenge requested before the imports.

Attestation takes two round trips to the CAS: a challenge (after the TLS handshake) and
then the evidence. The evidence needs the measurement and the launcher's modules; the
challenge needs neither. So the entrypoint requests the challenge in a thread
(:class:`EarlyChallenge`) while the launcher imports the rest of its modules, and the
evidence is sent on the same connection afterwards. If the early request fails, the
launcher requests a challenge again the usual way and reports the error.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

import _thread
import os
import posixpath

from enclavify import logs
from enclavify.errors import LaunchError
from enclavify.runtime.config import CONFIG_NAME, RUNTIME_DIR, RuntimeConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from os import PathLike
    from typing import Optional

    from enclavify.cas.client import CasClient

    _PathText = str | PathLike[str]

log = logs.get_logger(__name__)

INSECURE_CONFIG_VARIABLE = "ENCLAVIFY_INSECURE_CONFIG_FILE"
CAS_ADDRESS_VARIABLES = ("ENCLAVIFY_CAS_ADDR", "SCONE_CAS_ADDR")
CONFIG_ID_VARIABLES = ("ENCLAVIFY_CONFIG_ID", "SCONE_CONFIG_ID")


class CasSettings:
    """CAS address, configuration id and the pinned CA certificate or its fingerprint."""

    def __init__(
        self, address: str, config_id: str, ca_pem: Optional[bytes], fingerprint: Optional[str]
    ) -> None:
        self.address = address
        self.config_id = config_id
        self.ca_pem = ca_pem
        self.fingerprint = fingerprint

    def client(self) -> CasClient:
        """Return a client for the CAS; the first call imports the client module and ssl.

        Raises:
            LaunchError: the runtime lacks a module the client needs.
        """
        try:
            from enclavify.cas.client import CasClient  # noqa: PLC0415
        except ImportError as error:
            raise LaunchError(f"this runtime cannot attest: {error}") from error
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
    """Challenge requested from the CAS in a thread, for the first attestation attempt.

    The thread connects only once. The launcher's own request retries with backoff, but only
    if this one failed. :meth:`nonce` waits for the thread, so no thread is left when the
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
        _thread.start_new_thread(self._request, ())

    def _request(self) -> None:
        try:
            self._nonce = self.client.challenge()
        except Exception as error:  # the launcher requests again and reports the error
            log.debug("early challenge from the CAS at %s failed: %s", self.settings.address, error)
        finally:
            self._done.release()

    def nonce(self) -> Optional[bytes]:
        """Wait for the thread and return the nonce, or None if the request failed."""
        with self._done:
            self.client.attempts = self._attempts
            return self._nonce


def start_challenge(
    environ: Mapping[str, str], runtime_dir: _PathText = RUNTIME_DIR
) -> Optional[EarlyChallenge]:
    """Start requesting a challenge from the CAS if the launcher will attest; else return None.

    Invalid settings also give None, because the launcher meets them again and reports them
    in its usual order. The challenge goes out before the launcher checks its loaded
    libraries; it carries no key and no evidence.
    """
    if environ.get(INSECURE_CONFIG_VARIABLE):
        return None
    try:
        config = RuntimeConfig.load(os.path.join(runtime_dir, CONFIG_NAME))
        settings = cas_settings(config, environ, runtime_dir)
        client = settings.client()
    except Exception as error:  # the launcher meets it again and reports it
        log.debug("no early challenge: %s", error)
        return None
    return EarlyChallenge(settings, client)
