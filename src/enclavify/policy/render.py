"""Render a service's configuration: the session with secret values substituted.

The result is what the CAS seals to an attested launcher (the configuration in the
attestation wire format of ``docs/architecture.md``).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from enclavify.errors import PolicyError, SecretError
from enclavify.policy import model
from enclavify.policy.variables import Reference, substitute
from enclavify.secrets.value import SecretValue


def render_text(text: str, values: Mapping[str, SecretValue], path: str) -> str:
    """Substitute the ``$$SCONE::…$$`` variables of ``text``.

    Raises:
        SecretError: a referenced secret has no value, or cannot be rendered in the format;
            the message names ``path`` but never a value.
    """

    def lookup(reference: Reference) -> str:
        value = values.get(reference.name)
        if value is None:
            raise SecretError(f"{path}: no value for secret {reference.name!r}")
        try:
            return value.render(reference.format)
        except SecretError as exc:
            raise SecretError(f"{path}: secret {reference.name!r}: {exc}") from None

    return substitute(text, lookup)


def render_configuration(
    session: model.Session, service: str, values: Mapping[str, SecretValue]
) -> dict[str, Any]:
    """Return the configuration of ``service`` with every secret variable rendered.

    The keys are ``command`` (list), ``environment`` (mapping), ``pwd``, ``fspf_key`` and
    ``fspf_tag`` (hex, or None when the service has no protected file system) and
    ``injection_files`` (``path``, base64 ``content`` and integer ``mode``, from the image
    the service names).

    Raises:
        PolicyError: the session has no service of that name.
        SecretError: a referenced secret has no value or cannot be rendered as requested.
    """
    index = next((i for i, s in enumerate(session.services) if s.name == service), None)
    if index is None:
        raise PolicyError(f"session {session.name!r} has no service {service!r}", "services")
    definition = session.services[index]
    path = f"services[{index}]"

    command = [
        render_text(word, values, f"{path}.command[{i}]")
        for i, word in enumerate(definition.command)
    ]
    environment = {
        key: render_text(item, values, f"{path}.environment.{key}")
        for key, item in definition.environment.items()
    }

    injection_files: list[dict[str, Any]] = []
    if definition.image_name is not None:
        image_index = next(
            (i for i, image in enumerate(session.images) if image.name == definition.image_name),
            None,
        )
        if image_index is None:
            raise PolicyError(
                f"image {definition.image_name!r} is not defined in images", f"{path}.image_name"
            )
        image = session.images[image_index]
        for i, injected in enumerate(image.injection_files):
            content = render_text(
                injected.content, values, f"images[{image_index}].injection_files[{i}].content"
            )
            injection_files.append(
                {
                    "path": injected.path,
                    "content": base64.b64encode(content.encode("utf-8")).decode("ascii"),
                    "mode": injected.mode,
                }
            )

    return {
        "command": command,
        "environment": environment,
        "pwd": definition.pwd,
        "fspf_key": definition.fspf_key,
        "fspf_tag": definition.fspf_tag,
        "injection_files": injection_files,
    }
