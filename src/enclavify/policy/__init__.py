"""Sessions: the model, strict parsing, hashing, templates, rendering and claim checks.

Public surface:

- :func:`parse_session` turns session YAML into a :class:`Session`, or raises
  :class:`~enclavify.errors.PolicyError` naming the YAML path of the fault.
- :func:`session_to_dict`, :func:`session_hash` and :func:`redacted` give the normalized
  form, its SHA-256 and a view without key material.
- :func:`fill_template` fills a session template (:func:`default_template`) with the
  values of a conversion and the ``SECRETS`` and ``INJECTED_FILES`` hooks.
- :func:`render_configuration` fills a service's configuration with secret values.
- :func:`check_claims` decides whether attestation claims satisfy a service's policy.
"""

from enclavify.policy.canonical import redacted, session_hash, session_to_dict
from enclavify.policy.claims import check_claims
from enclavify.policy.loader import Limits, load_yaml
from enclavify.policy.model import (
    AccessPolicy,
    AttestationPolicy,
    Image,
    InjectionFile,
    SecretDefinition,
    SecretImport,
    Service,
    ServiceAttestation,
    Session,
    Volume,
    VolumeMount,
)
from enclavify.policy.parse import parse_session, session_from_dict
from enclavify.policy.render import render_configuration, render_text
from enclavify.policy.template import default_template, fill_template, session_image_name

__all__ = [
    "AccessPolicy",
    "AttestationPolicy",
    "Image",
    "InjectionFile",
    "Limits",
    "SecretDefinition",
    "SecretImport",
    "Service",
    "ServiceAttestation",
    "Session",
    "Volume",
    "VolumeMount",
    "check_claims",
    "default_template",
    "fill_template",
    "load_yaml",
    "parse_session",
    "redacted",
    "render_configuration",
    "render_text",
    "session_from_dict",
    "session_hash",
    "session_image_name",
    "session_to_dict",
]
