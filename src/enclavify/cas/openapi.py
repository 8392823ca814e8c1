"""The OpenAPI 3.0 description of the CAS's HTTP API, served at ``/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "description": "Refused; ``error`` says why.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            }
        }
    },
}

_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "Session name; namespaces nest with '/'.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.~/-]{1,512}$"},
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): _ERROR for status in statuses}


_SESSION_RESULT = {
    "type": "object",
    "required": ["name", "hash", "revision"],
    "properties": {
        "name": {"type": "string"},
        "hash": {"type": "string"},
        "revision": {"type": "integer"},
    },
}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "enclavify CAS",
        "version": "1",
        "description": "Sessions, public values and attested configuration release. Clients"
        " identify themselves with a TLS client certificate; callers without one may only"
        " read public values, ask for challenges and attest.",
    },
    "paths": {
        "/v1/sessions": {
            "post": {
                "summary": "Create a session, or update it when the document names a predecessor",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/yaml": {"schema": {"type": "string"}},
                        "application/json": {"schema": {"type": "object"}},
                    },
                },
                "responses": {
                    "200": _json(_SESSION_RESULT, "Stored; the new hash."),
                    **_errors(400, 403, 404, 409, 413),
                },
            }
        },
        "/v1/sessions/{name}": {
            "get": {
                "summary": "The session with secrets redacted, and its hash",
                "parameters": [_NAME],
                "responses": {
                    "200": _json({"type": "object"}, "The redacted session."),
                    **_errors(403, 404),
                },
            }
        },
        "/v1/sessions/{name}/history": {
            "get": {
                "summary": "Every revision of the session, oldest first",
                "parameters": [_NAME],
                "responses": {
                    "200": _json({"type": "object"}, "The revisions."),
                    **_errors(403, 404),
                },
            }
        },
        "/v1/values/session={name}": {
            "get": {
                "summary": "The session's export_public secret values",
                "parameters": [_NAME],
                "responses": {
                    "200": _json({"type": "object"}, "Values by secret name."),
                    **_errors(404),
                },
            }
        },
        "/v1/attest/challenge": {
            "post": {
                "summary": "A single-use nonce for one attestation",
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["nonce", "expires_at"],
                            "properties": {
                                "nonce": {"type": "string"},
                                "expires_at": {"type": "string"},
                            },
                        },
                        "The nonce (hex) and when it expires.",
                    ),
                    **_errors(400, 413),
                },
            }
        },
        "/v1/attest": {
            "post": {
                "summary": "Present evidence; receive the service configuration sealed to the"
                " launcher's X25519 key",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["config_id", "nonce", "public_key", "evidence"],
                                "properties": {
                                    "config_id": {"type": "string"},
                                    "nonce": {"type": "string"},
                                    "public_key": {"type": "string"},
                                    "evidence": {
                                        "type": "object",
                                        "required": ["type", "data"],
                                        "properties": {
                                            "type": {"type": "string"},
                                            "data": {"type": "string"},
                                        },
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["cas_public_key", "nonce", "ciphertext"],
                            "properties": {
                                "cas_public_key": {"type": "string"},
                                "nonce": {"type": "string"},
                                "ciphertext": {"type": "string"},
                            },
                        },
                        "The sealed configuration.",
                    ),
                    **_errors(400, 403, 413),
                },
            }
        },
        "/v1/ca-certificate": {
            "get": {
                "summary": "The CAS's CA certificate (PEM); check it against a pinned fingerprint",
                "responses": {
                    "200": {
                        "description": "PEM certificate.",
                        "content": {"application/x-pem-file": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This description",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0 document.")},
            }
        },
    },
}
