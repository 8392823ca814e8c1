"""The simulation "evidence": the launcher's own statement of its measurement.

Simulation evidence proves nothing. Any program can write this JSON with any measurement it
likes, and no hardware or vendor key vouches for it. It exists so that images can be converted,
run and wired to a CAS on machines without a TEE. Whether to accept it is the session policy's
decision (``security.attestation.mode: simulation``); the CAS logs every such acceptance as
insecure.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime

from enclavify.attest.claims import REPORT_DATA_SIZE, SIMULATION, Claims
from enclavify.attest.collateral import Collateral
from enclavify.errors import AttestationError

log = logging.getLogger(__name__)

SIMULATION_TCB_STATUS = "Simulation"

_HEX = re.compile(r"[0-9a-f]+")


class SimulationVerifier:
    """Checks the form of simulation evidence and turns it into claims, without any trust.

    The claims are exactly what the launcher wrote; ``tcb_status`` is ``Simulation`` and
    ``debug`` is false because there is no enclave whose debug attribute could be read.
    """

    evidence_type = SIMULATION

    def verify(self, data: bytes, *, now: datetime, collateral: Collateral | None) -> Claims:
        """Parse ``{"measurement": hex, "report_data": hex}``; ``now`` and collateral are unused.

        Raises:
            AttestationError: if the JSON is malformed, or a field is missing, not lower-case
                hex, or the report data is not 64 bytes.
        """
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise AttestationError(f"simulation evidence is not valid JSON: {error}") from error
        if not isinstance(document, dict):
            raise AttestationError("simulation evidence must be a JSON object")
        unknown = sorted(set(document) - {"measurement", "report_data"})
        if unknown:
            raise AttestationError(f"simulation evidence has unknown fields: {', '.join(unknown)}")
        measurement = _hex_field(document, "measurement")
        report_data = bytes.fromhex(_hex_field(document, "report_data"))
        if len(report_data) != REPORT_DATA_SIZE:
            raise AttestationError(
                f"simulation report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}"
            )
        log.debug("parsed simulation evidence for measurement %s", measurement)
        return Claims(
            evidence_type=SIMULATION,
            measurement=measurement,
            report_data=report_data,
            debug=False,
            tcb_status=SIMULATION_TCB_STATUS,
        )


def _hex_field(document: dict[str, object], name: str) -> str:
    value = document.get(name)
    if value is None:
        raise AttestationError(f"simulation evidence lacks {name!r}")
    if not isinstance(value, str) or len(value) % 2 or not _HEX.fullmatch(value):
        raise AttestationError(f"simulation {name} must be lower-case hex with an even length")
    return value
