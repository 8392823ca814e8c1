"""Fill a session template with the values of a conversion and the user's hooks.

A template is session YAML with two kinds of placeholders:

- ``$NAME`` or ``${NAME}`` for one of the variables of :func:`fill_template`. Each stands
  for a whole YAML value and is replaced by a double-quoted string, or by a flow-style list
  or mapping, so no value can break out of its place in the document.
- A line holding only ``$SECRETS`` or ``$INJECTED_FILES`` (with any indentation), replaced
  by that hook: a YAML fragment with a ``secrets:`` list, or an ``injection_files:`` list
  for the service's image. The hook's own common indentation is removed and the
  placeholder's indentation applied instead, so a hook works wherever it was indented when
  it was written.

Text starting with ``$$`` (as in ``$$SCONE::flask.crt$$``) is not a placeholder, and full
comment lines are copied unchanged. Any other ``$NAME`` is an error, so a misspelt variable
cannot reach the CAS.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from enclavify.errors import PolicyError
from enclavify.policy.loader import load_yaml
from enclavify.policy.parse import parse_session

DEFAULT_TEMPLATE = "session-template.yml"

_HOOK_LINE = re.compile(r"(?P<indent>[ ]*)\$(?:\{(?P<a>[A-Z_]+)\}|(?P<b>[A-Z_]+))[ \t]*")
_VARIABLE = re.compile(r"(?<!\$)\$(?:\{(?P<braced>[A-Z_][A-Z0-9_]*)\}|(?P<bare>[A-Z_][A-Z0-9_]*))")
_IMAGE_NAME_INVALID = re.compile(r"[^A-Za-z0-9_\-.~]+")
HOOKS = {"SECRETS": "secrets", "INJECTED_FILES": "injection_files"}


def default_template() -> str:
    """Return the template shipped with enclavify."""
    return (
        resources.files("enclavify")
        .joinpath("templates", DEFAULT_TEMPLATE)
        .read_text(encoding="utf-8")
    )


def session_image_name(reference: str) -> str:
    """Turn an image reference into a name the session language accepts.

    ``registry:5000/team/app:1.2`` becomes ``registry_5000_team_app_1.2``; the session only
    uses the name to link a service to its ``images`` entry.
    """
    name = _IMAGE_NAME_INVALID.sub("_", reference).strip("_")[:128]
    if name in ("", ".", ".."):
        return "image"
    return name


def fill_template(
    template: str,
    *,
    name: str,
    namespace: str | None = None,
    service_name: str = "service",
    image_name: str,
    measurement: str,
    command: Sequence[str],
    environment: Mapping[str, str],
    pwd: str = "/",  # noqa: S107 - the working directory, not a password
    fspf_path: str,
    fspf_key: str,
    fspf_tag: str,
    secrets_hook: str | None = None,
    injected_files_hook: str | None = None,
    predecessor: str | None = None,
    attestation_mode: str = "hardware",
    tolerate: Sequence[str] = (),
    ignore_advisories: Sequence[str] | str = (),
) -> str:
    """Return the session text for one converted service, checked with ``parse_session``.

    ``name`` is the session name below ``namespace`` (or the full name when ``namespace``
    is None); the template gets ``$SESSION`` (the full name), ``$NAMESPACE`` and ``$NAME``.
    ``image_name`` may be any image reference; it is turned into a valid session name with
    :func:`session_image_name`. The other variables are ``$SERVICE_NAME``, ``$IMAGE_NAME``,
    ``$MEASUREMENT`` (also ``$MRENCLAVE``), ``$COMMAND``, ``$ENVIRONMENT``, ``$PWD``,
    ``$FSPF_PATH``, ``$FSPF_KEY``, ``$FSPF_TAG``, ``$PREDECESSOR`` (null when None),
    ``$ATTESTATION_MODE``, ``$TOLERATE`` and ``$IGNORE_ADVISORIES``. When ``predecessor``
    is given and the template has no ``$PREDECESSOR``, a ``predecessor`` line is appended.

    Raises:
        PolicyError: a hook is not the expected YAML fragment, the template lacks the
            placeholder for a given hook or uses an unknown variable, or the filled
            session is invalid (``path`` then locates the fault in the filled session).
    """
    full_name = f"{namespace}/{name}" if namespace else name
    variables: dict[str, Any] = {
        "SESSION": full_name,
        "NAMESPACE": namespace or "",
        "NAME": name,
        "SERVICE_NAME": service_name,
        "IMAGE_NAME": session_image_name(image_name),
        "MEASUREMENT": measurement,
        "MRENCLAVE": measurement,
        "COMMAND": list(command),
        "ENVIRONMENT": dict(environment),
        # An image without a working directory has an empty one, which means "/".
        "PWD": pwd or "/",
        "FSPF_PATH": fspf_path,
        "FSPF_KEY": fspf_key,
        "FSPF_TAG": fspf_tag,
        "PREDECESSOR": predecessor,
        "ATTESTATION_MODE": attestation_mode,
        "TOLERATE": list(tolerate),
        "IGNORE_ADVISORIES": ignore_advisories
        if isinstance(ignore_advisories, str)
        else list(ignore_advisories),
    }
    hooks = {
        "SECRETS": _checked_hook(secrets_hook, "SECRETS"),
        "INJECTED_FILES": _checked_hook(injected_files_hook, "INJECTED_FILES"),
    }

    placed: set[str] = set()
    used: set[str] = set()
    lines: list[str] = []
    for number, line in enumerate(template.splitlines(), start=1):
        if line.lstrip().startswith("#"):
            lines.append(line)
            continue
        hook_match = _HOOK_LINE.fullmatch(line)
        hook_name = hook_match and (hook_match.group("a") or hook_match.group("b"))
        if hook_match and hook_name in HOOKS:
            placed.add(hook_name)
            fragment = hooks[hook_name]
            if fragment:
                lines.extend(textwrap.indent(fragment, hook_match.group("indent")).splitlines())
            continue
        lines.append(_substitute(line, number, variables, used))

    for hook_name, fragment in hooks.items():
        if fragment and hook_name not in placed:
            raise PolicyError(
                f"the template has no line holding only ${hook_name}, so the {hook_name} "
                "hook cannot be placed"
            )
    if predecessor is not None and "PREDECESSOR" not in used:
        lines.append(f"predecessor: {_flow(predecessor)}")

    text = "\n".join(lines) + "\n"
    try:
        parse_session(text)
    except PolicyError as exc:
        raise PolicyError(f"the filled template is not a valid session: {exc}", exc.path) from None
    return text


def _checked_hook(fragment: str | None, hook: str) -> str | None:
    """Return the hook without its common indentation, after checking its shape."""
    if fragment is None or not fragment.strip():
        return None
    text = textwrap.dedent(fragment.expandtabs(8)).strip("\n") + "\n"
    expected = HOOKS[hook]
    document = load_yaml(text, label=f"the {hook} hook")
    if not isinstance(document, dict) or list(document) != [expected]:
        raise PolicyError(
            f"the {hook} hook must be a YAML mapping with the single key {expected!r}"
        )
    if not isinstance(document[expected], list):
        raise PolicyError(f"{expected!r} in the {hook} hook must be a list", expected)
    return text


def _substitute(line: str, number: int, variables: Mapping[str, Any], used: set[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        variable = match.group("braced") or match.group("bare")
        if variable not in variables:
            raise PolicyError(
                f"unknown template variable ${variable} on line {number}; expected one of "
                + ", ".join(f"${key}" for key in sorted(variables))
            )
        used.add(variable)
        return _flow(variables[variable])

    return _VARIABLE.sub(replace, line)


def _flow(value: Any) -> str:
    """Write ``value`` as YAML flow text that reads back as exactly ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{_quoted(str(k))}: {_flow(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} into a template")


def _quoted(text: str) -> str:
    parts = ['"']
    for char in text:
        code = ord(char)
        if char in ('"', "\\"):
            parts.append("\\" + char)
        elif (
            code < 0x20
            or 0x7F <= code <= 0x9F
            or 0xD800 <= code <= 0xDFFF
            or code
            in (
                0xFFFE,
                0xFFFF,
            )
        ):
            parts.append(f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")
        else:
            parts.append(char)
    parts.append('"')
    return "".join(parts)
