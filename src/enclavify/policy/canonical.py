"""The normalized dictionary form of a session, its hash and its redacted view.

:func:`session_to_dict` writes every field in one normalized spelling: defaults filled in,
the legacy ``mrenclaves`` folded into ``attestation.mrenclave``, commands as lists, hex in
lower case, file modes as integers, durations as ``"N days"`` or ``"N hours"`` and set-like
lists (tolerations, advisories, exports) sorted. Parsing that dictionary gives back an equal
session.

:func:`session_hash` is SHA-256 over ``b"enclavify-session-v1\\n"`` followed by the UTF-8
JSON of that dictionary with sorted keys and no whitespace. Nothing is left out: explicit
secret values, fspf keys and the predecessor are all covered, so any change gives a new hash.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from enclavify.policy import model

HASH_DOMAIN = b"enclavify-session-v1\n"
REDACTED = "<redacted>"


def _duration(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400} days"
    return f"{seconds // 3600} hours"


def _service(service: model.Service) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": service.name,
        "command": list(service.command),
        "environment": dict(service.environment),
        "pwd": service.pwd,
        "attestation": {
            kind: list(getattr(service.attestation, kind))
            for kind in ("mrenclave", "mrsigner", "mrtd", "snp_measurement")
        },
    }
    if service.image_name is not None:
        result["image_name"] = service.image_name
    if service.fspf_path is not None:
        result["fspf_path"] = service.fspf_path
        result["fspf_key"] = service.fspf_key
        result["fspf_tag"] = service.fspf_tag
    return result


def _image(image: model.Image) -> dict[str, Any]:
    return {
        "name": image.name,
        "injection_files": [
            {"path": f.path, "content": f.content, "mode": f.mode} for f in image.injection_files
        ],
        "volumes": [{"name": v.name, "path": v.path} for v in image.volumes],
    }


def _volume(volume: model.Volume) -> dict[str, Any]:
    result: dict[str, Any] = {"name": volume.name}
    if volume.fspf_key is not None:
        result["fspf_key"] = volume.fspf_key
        result["fspf_tag"] = volume.fspf_tag
    return result


def _secret(secret: model.SecretDefinition) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": secret.name,
        "kind": secret.kind,
        "export_public": secret.export_public,
    }
    if secret.export:
        result["export"] = [{"session": name} for name in secret.export]
    if secret.import_from is not None:
        result["import"] = {
            "session": secret.import_from.session,
            "secret": secret.import_from.secret,
        }
    optional: dict[str, Any] = {
        "value": secret.value,
        "size": secret.size,
        "key_type": secret.key_type,
        "private_key": secret.private_key,
        "issuer": secret.issuer,
        "common_name": secret.common_name,
        "valid_for": None if secret.valid_for is None else _duration(secret.valid_for),
        "endpoint": secret.endpoint,
    }
    result.update({key: value for key, value in optional.items() if value is not None})
    if secret.kind == "x509" and secret.value is None and secret.import_from is None:
        result["dns"] = list(secret.dns)
        result["san"] = list(secret.san)
    return result


def session_to_dict(session: model.Session) -> dict[str, Any]:
    """Return the normalized dictionary form of a session (see the module docstring)."""
    attestation: dict[str, Any] = {
        "mode": session.attestation.mode,
        "tolerate": list(session.attestation.tolerate),
        "ignore_advisories": "*"
        if session.attestation.ignore_all_advisories
        else list(session.attestation.ignore_advisories),
    }
    result: dict[str, Any] = {
        "name": session.name,
        "access_policy": {
            "read": list(session.access_policy.read),
            "update": list(session.access_policy.update),
            "create_sessions": list(session.access_policy.create_sessions),
        },
        "services": [_service(s) for s in session.services],
        "images": [_image(i) for i in session.images],
        "volumes": [_volume(v) for v in session.volumes],
        "secrets": [_secret(s) for s in session.secrets],
        "security": {"attestation": attestation},
    }
    if session.version is not None:
        result["version"] = session.version
    if session.predecessor is not None:
        result["predecessor"] = session.predecessor
    return result


def canonical_bytes(session: model.Session) -> bytes:
    """Return the exact bytes :func:`session_hash` hashes."""
    encoded = json.dumps(
        session_to_dict(session), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return HASH_DOMAIN + encoded.encode("utf-8")


def session_hash(session: model.Session) -> str:
    """Return the session hash as 64 lower-case hex digits."""
    return hashlib.sha256(canonical_bytes(session)).hexdigest()


def redacted(session: model.Session) -> dict[str, Any]:
    """Return :func:`session_to_dict` with key material replaced by ``"<redacted>"``.

    Replaced: explicit secret ``value`` fields and the ``fspf_key`` of services and volumes.
    Kept: ``fspf_tag`` (an integrity tag, not a key), measurements, and injected file
    contents, which name secrets through ``$$SCONE::…$$`` variables instead of holding them.
    A secret written literally into an injected file's content is therefore shown; such
    material belongs in ``secrets`` with a ``value``.
    """
    result = session_to_dict(session)
    for secret in result["secrets"]:
        if "value" in secret:
            secret["value"] = REDACTED
    for item in (*result["services"], *result["volumes"]):
        if "fspf_key" in item:
            item["fspf_key"] = REDACTED
    return result
