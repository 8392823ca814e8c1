"""Strict parsing of the session language into :mod:`enclavify.policy.model`.

Every fault raises :class:`~enclavify.errors.PolicyError` whose ``path`` names the place in
the document, such as ``services[0].environment.HOME``. The language is described for users
in ``docs/session-language.md``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

from enclavify.errors import PolicyError
from enclavify.policy import model
from enclavify.policy.loader import DEFAULT_LIMITS, Limits, load_yaml
from enclavify.policy.variables import MalformedVariable, find_references
from enclavify.secrets.value import FORMATS

T = TypeVar("T")

NAME_COMPONENT = re.compile(r"[A-Za-z0-9_\-.~]{1,128}")
SECRET_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
_HEX = re.compile(r"[0-9a-fA-F]*")
_ENV_NAME = re.compile(r"[^=\x00]+")
_DNS_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_DURATION = re.compile(r"\s*(\d{1,6})\s*(hours?|days?|weeks?|years?)\s*")
_UNIT_SECONDS = {"hour": 3600, "day": 86400, "week": 7 * 86400, "year": 365 * 86400}
MAX_VALIDITY = 100 * 365 * 86400
DEFAULT_VALIDITY = {"x509-ca": 3650 * 86400, "x509": 365 * 86400}
DEFAULT_SIZE = {"ascii": 20, "binary": 32}
MAX_SECRET_SIZE = 65536

# Measurement sizes in bytes for each list of `attestation`.
MEASUREMENT_SIZES = {"mrenclave": 32, "mrsigner": 32, "mrtd": 48, "snp_measurement": 48}

_TOP_KEYS = {
    "name",
    "version",
    "predecessor",
    "access_policy",
    "services",
    "images",
    "volumes",
    "secrets",
    "security",
}


def parse_session(text: str | bytes, *, limits: Limits = DEFAULT_LIMITS) -> model.Session:
    """Parse and validate a session document.

    Raises:
        PolicyError: the document is not a valid session; ``path`` locates the fault.
    """
    document = load_yaml(text, limits=limits, label="session")
    return session_from_dict(document)


def session_from_dict(document: Any) -> model.Session:
    """Validate an already loaded session document (as from YAML or JSON).

    Raises:
        PolicyError: as :func:`parse_session`.
    """
    top = _mapping(document, "", allowed=_TOP_KEYS, required={"name"})
    session = model.Session(
        name=_session_name(top["name"], "name"),
        version=_optional(top, "version", "", _version),
        predecessor=_optional(top, "predecessor", "", lambda v, p: _hex(v, p, 32)),
        access_policy=_access_policy(top.get("access_policy"), "access_policy"),
        services=_list_of(top.get("services"), "services", _service),
        images=_list_of(top.get("images"), "images", _image),
        volumes=_list_of(top.get("volumes"), "volumes", _volume),
        secrets=_list_of(top.get("secrets"), "secrets", _secret),
        attestation=_security(top.get("security"), "security"),
    )
    _check_unique(session)
    _check_references(session)
    return session


# Generic helpers ---------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _mapping(
    value: Any,
    path: str,
    *,
    allowed: set[str],
    required: set[str] = frozenset(),  # type: ignore[assignment]
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"expected a mapping, found {_type_name(value)}", path)
    for key in value:
        if not isinstance(key, str):
            raise PolicyError(f"keys must be strings, found {_type_name(key)} {key!r}", path)
        if key not in allowed:
            raise PolicyError(
                f"unknown key {key!r}; expected one of {', '.join(sorted(allowed))}",
                _join(path, key),
            )
    for key in sorted(required):
        if value.get(key) is None:
            raise PolicyError(f"missing required key {key!r}", _join(path, key))
    return value


def _optional(
    mapping: Mapping[str, Any], key: str, path: str, convert: Callable[[Any, str], T]
) -> T | None:
    value = mapping.get(key)
    if value is None:
        return None
    return convert(value, _join(path, key))


def _string(value: Any, path: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        hint = " (quote it)" if isinstance(value, (int, float, bool)) else ""
        raise PolicyError(f"expected a string, found {_type_name(value)}{hint}", path)
    if not allow_empty and not value:
        raise PolicyError("must not be empty", path)
    if "\x00" in value:
        raise PolicyError("must not contain a NUL character", path)
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"expected true or false, found {_type_name(value)}", path)
    return value


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"expected a list, found {_type_name(value)}", path)
    return value


def _list_of(value: Any, path: str, convert: Callable[[Any, str], T]) -> tuple[T, ...]:
    return tuple(convert(item, f"{path}[{i}]") for i, item in enumerate(_list(value, path)))


def _hex(value: Any, path: str, size: int) -> str:
    text = _string(value, path)
    if not _HEX.fullmatch(text) or len(text) != 2 * size:
        raise PolicyError(f"expected {size} bytes as {2 * size} hex digits", path)
    return text.lower()


def _component(value: Any, path: str) -> str:
    text = _string(value, path)
    if not NAME_COMPONENT.fullmatch(text) or text in (".", ".."):
        raise PolicyError(
            f"invalid name {text!r}: use 1 to 128 of A-Z a-z 0-9 _ - . ~ (not '.' or '..')", path
        )
    return text


def _session_name(value: Any, path: str) -> str:
    text = _string(value, path)
    for component in text.split("/"):
        if not NAME_COMPONENT.fullmatch(component) or component in (".", ".."):
            raise PolicyError(
                f"invalid session name {text!r}: each '/'-separated component needs 1 to 128 "
                "of A-Z a-z 0-9 _ - . ~ (not '.' or '..')",
                path,
            )
    return text


def _version(value: Any, path: str) -> str:
    return _string(value, path)


def _absolute_path(value: Any, path: str) -> str:
    text = _string(value, path)
    if not text.startswith("/"):
        raise PolicyError(f"path {text!r} must be absolute", path)
    parts = text.split("/")
    if ".." in parts:
        raise PolicyError(f"path {text!r} must not contain '..'", path)
    normalized = "/" + "/".join(p for p in parts if p not in ("", "."))
    return normalized


# Sections ----------------------------------------------------------------------------


def _access_policy(value: Any, path: str) -> model.AccessPolicy:
    if value is None:
        return model.AccessPolicy()
    fields = _mapping(value, path, allowed={"read", "update", "create_sessions"})
    default = model.AccessPolicy()

    def entries(key: str) -> tuple[str, ...]:
        if fields.get(key) is None:
            return tuple(getattr(default, key))
        key_path = _join(path, key)
        result: list[str] = []
        for i, item in enumerate(_list(fields[key], key_path)):
            item_path = f"{key_path}[{i}]"
            text = _string(item, item_path)
            if text not in (model.CREATOR, model.ANY, model.NONE):
                text = _hex(text, item_path, 32)
            if text in result:
                raise PolicyError(f"duplicate entry {text!r}", item_path)
            result.append(text)
        if model.NONE in result and len(result) > 1:
            raise PolicyError("NONE cannot be combined with other entries", key_path)
        if not result:
            raise PolicyError("must not be empty; write [NONE] to allow nobody", key_path)
        return tuple(result)

    return model.AccessPolicy(
        read=entries("read"), update=entries("update"), create_sessions=entries("create_sessions")
    )


_SERVICE_KEYS = {
    "name",
    "image_name",
    "mrenclaves",
    "attestation",
    "command",
    "environment",
    "pwd",
    "fspf_path",
    "fspf_key",
    "fspf_tag",
}


def _service(value: Any, path: str) -> model.Service:
    fields = _mapping(value, path, allowed=_SERVICE_KEYS, required={"name", "command"})
    name = _component(fields["name"], _join(path, "name"))
    if "/" in name:
        raise PolicyError("service names must not contain '/'", _join(path, "name"))
    fspf = {key: fields.get(key) for key in ("fspf_path", "fspf_key", "fspf_tag")}
    given = [key for key, v in fspf.items() if v is not None]
    if given and len(given) != 3:
        missing = sorted(set(fspf) - set(given))
        raise PolicyError(
            f"fspf_path, fspf_key and fspf_tag go together; missing {', '.join(missing)}",
            _join(path, missing[0]),
        )
    return model.Service(
        name=name,
        command=_command(fields["command"], _join(path, "command")),
        image_name=_optional(fields, "image_name", path, _component),
        attestation=_service_attestation(fields, path),
        environment=MappingProxyType(
            _environment(fields.get("environment"), _join(path, "environment"))
        ),
        pwd=_optional(fields, "pwd", path, _absolute_path) or "/",
        fspf_path=_optional(fields, "fspf_path", path, _absolute_path),
        fspf_key=_optional(fields, "fspf_key", path, lambda v, p: _hex(v, p, 32)),
        fspf_tag=_optional(fields, "fspf_tag", path, lambda v, p: _hex(v, p, 16)),
    )


def _measurements(value: Any, path: str, kind: str, into: list[str]) -> None:
    for i, item in enumerate(_list(value, path)):
        measurement = _hex(item, f"{path}[{i}]", MEASUREMENT_SIZES[kind])
        if measurement not in into:
            into.append(measurement)


def _service_attestation(fields: Mapping[str, Any], path: str) -> model.ServiceAttestation:
    lists: dict[str, list[str]] = {kind: [] for kind in MEASUREMENT_SIZES}
    if fields.get("mrenclaves") is not None:
        _measurements(
            fields["mrenclaves"], _join(path, "mrenclaves"), "mrenclave", lists["mrenclave"]
        )
    if fields.get("attestation") is not None:
        att_path = _join(path, "attestation")
        att = _mapping(fields["attestation"], att_path, allowed=set(MEASUREMENT_SIZES))
        for kind, items in att.items():
            _measurements(items, _join(att_path, kind), kind, lists[kind])
    return model.ServiceAttestation(**{kind: tuple(items) for kind, items in lists.items()})


def _command(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        words = value.split()
        if not words:
            raise PolicyError("must not be empty", path)
        _string(value, path)
        return tuple(words)
    items = _list(value, path)
    if not items:
        raise PolicyError("must not be empty", path)
    return tuple(_string(item, f"{path}[{i}]", allow_empty=i > 0) for i, item in enumerate(items))


def _environment(value: Any, path: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyError(f"expected a mapping, found {_type_name(value)}", path)
    result: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise PolicyError(f"invalid environment variable name {key!r}", path)
        item_path = _join(path, key)
        if isinstance(item, int) and not isinstance(item, bool):
            result[key] = str(item)
        else:
            if not isinstance(item, str):
                raise PolicyError(
                    f"expected a string, found {_type_name(item)} (quote the value)", item_path
                )
            result[key] = _string(item, item_path, allow_empty=True)
    return result


def _mode(value: Any, path: str) -> int:
    if isinstance(value, bool):
        raise PolicyError("expected a file mode such as 0600", path)
    if isinstance(value, str):
        if not re.fullmatch(r"0?o?[0-7]{1,4}", value):
            raise PolicyError(f"invalid file mode {value!r}; write octal such as '0600'", path)
        value = int(value.replace("o", ""), 8)
    if not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise PolicyError(f"invalid file mode {value!r}", path)
    return value


def _injection_file(value: Any, path: str) -> model.InjectionFile:
    fields = _mapping(
        value, path, allowed={"path", "content", "permission", "mode"}, required={"path"}
    )
    if fields.get("permission") is not None and fields.get("mode") is not None:
        raise PolicyError("give either permission or mode, not both", _join(path, "mode"))
    file_path = _absolute_path(fields["path"], _join(path, "path"))
    if file_path == "/":
        raise PolicyError("an injected file cannot be '/'", _join(path, "path"))
    content = fields.get("content")
    mode_key = "mode" if fields.get("mode") is not None else "permission"
    return model.InjectionFile(
        path=file_path,
        content=""
        if content is None
        else _string(content, _join(path, "content"), allow_empty=True),
        mode=_optional(fields, mode_key, path, _mode) or 0o600,
    )


def _volume_mount(value: Any, path: str) -> model.VolumeMount:
    fields = _mapping(value, path, allowed={"name", "path"}, required={"name", "path"})
    return model.VolumeMount(
        name=_component(fields["name"], _join(path, "name")),
        path=_absolute_path(fields["path"], _join(path, "path")),
    )


def _image(value: Any, path: str) -> model.Image:
    fields = _mapping(
        value, path, allowed={"name", "injection_files", "volumes"}, required={"name"}
    )
    files = _list_of(fields.get("injection_files"), _join(path, "injection_files"), _injection_file)
    seen: set[str] = set()
    for i, injected in enumerate(files):
        if injected.path in seen:
            raise PolicyError(
                f"file {injected.path!r} is injected twice", f"{path}.injection_files[{i}].path"
            )
        seen.add(injected.path)
    return model.Image(
        name=_component(fields["name"], _join(path, "name")),
        injection_files=files,
        volumes=_list_of(fields.get("volumes"), _join(path, "volumes"), _volume_mount),
    )


def _volume(value: Any, path: str) -> model.Volume:
    fields = _mapping(value, path, allowed={"name", "fspf_key", "fspf_tag"}, required={"name"})
    if (fields.get("fspf_key") is None) != (fields.get("fspf_tag") is None):
        raise PolicyError("fspf_key and fspf_tag go together", path)
    return model.Volume(
        name=_component(fields["name"], _join(path, "name")),
        fspf_key=_optional(fields, "fspf_key", path, lambda v, p: _hex(v, p, 32)),
        fspf_tag=_optional(fields, "fspf_tag", path, lambda v, p: _hex(v, p, 16)),
    )


# Secrets -----------------------------------------------------------------------------

_COMMON_SECRET_KEYS = {"name", "kind", "value", "export_public", "export", "import"}
_SECRET_KEYS = {
    "ascii": _COMMON_SECRET_KEYS | {"size"},
    "binary": _COMMON_SECRET_KEYS | {"size"},
    "private-key": _COMMON_SECRET_KEYS | {"key_type"},
    "x509-ca": _COMMON_SECRET_KEYS
    | {"private_key", "issuer", "common_name", "valid_for", "key_type"},
    "x509": _COMMON_SECRET_KEYS
    | {"private_key", "issuer", "common_name", "dns", "san", "valid_for", "endpoint", "key_type"},
}


def _secret(value: Any, path: str) -> model.SecretDefinition:
    if not isinstance(value, dict):
        raise PolicyError(f"expected a mapping, found {_type_name(value)}", path)
    kind = _string(value.get("kind"), _join(path, "kind")) if "kind" in value else None
    if kind is None:
        raise PolicyError("missing required key 'kind'", _join(path, "kind"))
    if kind not in model.SECRET_KINDS:
        raise PolicyError(
            f"unknown secret kind {kind!r}; expected one of {', '.join(model.SECRET_KINDS)}",
            _join(path, "kind"),
        )
    fields = _mapping(value, path, allowed=_SECRET_KEYS[kind], required={"name", "kind"})
    name = _string(fields["name"], _join(path, "name"))
    if not SECRET_NAME.fullmatch(name):
        raise PolicyError(
            f"invalid secret name {name!r}: use 1 to 128 of A-Z a-z 0-9 _ -", _join(path, "name")
        )
    import_from = _optional(fields, "import", path, _secret_import)
    explicit = fields.get("value")
    if import_from is not None:
        extra = sorted(set(fields) - {"name", "kind", "import", "export_public", "export"})
        if extra:
            raise PolicyError(
                "an imported secret takes its value from the other session; remove "
                + ", ".join(extra),
                _join(path, extra[0]),
            )

    definition: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "export_public": _optional(fields, "export_public", path, _bool) or False,
        "export": _exports(fields.get("export"), _join(path, "export")),
        "import_from": import_from,
    }
    if explicit is not None:
        definition["value"] = _explicit_value(kind, explicit, _join(path, "value"))
        generator_keys = sorted(
            set(fields)
            & {
                "size",
                "key_type",
                "private_key",
                "issuer",
                "common_name",
                "dns",
                "san",
                "valid_for",
                "endpoint",
            }
        )
        if generator_keys:
            raise PolicyError(
                "an explicit value cannot be combined with generation settings",
                _join(path, generator_keys[0]),
            )
    elif import_from is None:
        definition.update(_generation_settings(kind, fields, path))
    return model.SecretDefinition(**definition)


def _secret_import(value: Any, path: str) -> model.SecretImport:
    fields = _mapping(value, path, allowed={"session", "secret"}, required={"session", "secret"})
    secret = _string(fields["secret"], _join(path, "secret"))
    if not SECRET_NAME.fullmatch(secret):
        raise PolicyError(f"invalid secret name {secret!r}", _join(path, "secret"))
    return model.SecretImport(
        session=_session_name(fields["session"], _join(path, "session")), secret=secret
    )


def _exports(value: Any, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, dict) else _list(value, path)
    result: list[str] = []
    for i, item in enumerate(items):
        item_path = path if isinstance(value, dict) else f"{path}[{i}]"
        fields = _mapping(item, item_path, allowed={"session"}, required={"session"})
        session = _session_name(fields["session"], _join(item_path, "session"))
        if session not in result:
            result.append(session)
    return tuple(sorted(result))


def _explicit_value(kind: str, value: Any, path: str) -> str:
    text = _string(value, path)
    if kind == "binary":
        if not _HEX.fullmatch(text) or len(text) % 2:
            raise PolicyError("a binary value must be hex with an even number of digits", path)
        return text.lower()
    if kind == "private-key" and "PRIVATE KEY-----" not in text:
        raise PolicyError("a private-key value must be a PEM private key", path)
    if kind in ("x509-ca", "x509") and (
        "-----BEGIN CERTIFICATE-----" not in text or "PRIVATE KEY-----" not in text
    ):
        raise PolicyError(
            "a certificate value must be PEM: the certificate, then its private key", path
        )
    return text


def _generation_settings(kind: str, fields: Mapping[str, Any], path: str) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if kind in ("ascii", "binary"):
        size = fields.get("size", DEFAULT_SIZE[kind])
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SECRET_SIZE:
            raise PolicyError(
                f"size must be an integer from 1 to {MAX_SECRET_SIZE}", _join(path, "size")
            )
        settings["size"] = size
        return settings
    if kind == "private-key" or fields.get("key_type") is not None:
        key_type = _optional(fields, "key_type", path, _string) or "P-256"
        if key_type not in model.KEY_TYPES:
            raise PolicyError(
                f"unknown key_type {key_type!r}; expected one of {', '.join(model.KEY_TYPES)}",
                _join(path, "key_type"),
            )
        settings["key_type"] = key_type
    if kind == "private-key":
        return settings
    if fields.get("key_type") is not None and fields.get("private_key") is not None:
        raise PolicyError(
            "key_type describes the certificate's own key; remove it when private_key is given",
            _join(path, "key_type"),
        )
    if fields.get("private_key") is None and "key_type" not in settings:
        settings["key_type"] = "P-256"
    settings["private_key"] = _optional(fields, "private_key", path, _secret_ref)
    settings["issuer"] = _optional(fields, "issuer", path, _secret_ref)
    settings["common_name"] = _optional(fields, "common_name", path, _string) or fields["name"]
    settings["valid_for"] = (
        _optional(fields, "valid_for", path, _duration) or DEFAULT_VALIDITY[kind]
    )
    if kind == "x509":
        settings["dns"] = tuple(
            _dns_name(item, f"{path}.dns[{i}]")
            for i, item in enumerate(_list(fields.get("dns"), _join(path, "dns")))
        )
        settings["san"] = tuple(
            _san(item, f"{path}.san[{i}]")
            for i, item in enumerate(_list(fields.get("san"), _join(path, "san")))
        )
        endpoint = _optional(fields, "endpoint", path, _string)
        if endpoint is not None and endpoint not in model.ENDPOINTS:
            raise PolicyError(
                f"unknown endpoint {endpoint!r}; expected server or client", _join(path, "endpoint")
            )
        settings["endpoint"] = endpoint
    return settings


def _secret_ref(value: Any, path: str) -> str:
    text = _string(value, path)
    if not SECRET_NAME.fullmatch(text):
        raise PolicyError(f"invalid secret name {text!r}", path)
    return text


def _duration(value: Any, path: str) -> int:
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match:
            seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2).rstrip("s")]
            if 0 < seconds <= MAX_VALIDITY:
                return seconds
    raise PolicyError(
        f"invalid duration {value!r}; write a number and a unit, such as '365 days' "
        "(hours, days, weeks or years; at most 100 years)",
        path,
    )


def _dns_name(value: Any, path: str) -> str:
    text = _string(value, path)
    if len(text) > 253 or not _DNS_NAME.fullmatch(text):
        raise PolicyError(f"invalid DNS name {text!r}", path)
    return text.lower()


def _san(value: Any, path: str) -> str:
    text = _string(value, path)
    kind, sep, rest = text.partition(":")
    if sep and kind.lower() == "dns":
        return "dns:" + _dns_name(rest, path)
    if sep and kind.lower() == "ip":
        try:
            return "ip:" + str(ipaddress.ip_address(rest))
        except ValueError:
            raise PolicyError(f"invalid IP address {rest!r}", path) from None
    raise PolicyError(
        f"invalid subject alternative name {text!r}; write dns:NAME or ip:ADDRESS", path
    )


# Security ----------------------------------------------------------------------------


def _security(value: Any, path: str) -> model.AttestationPolicy:
    if value is None:
        return model.AttestationPolicy()
    fields = _mapping(value, path, allowed={"attestation"})
    if fields.get("attestation") is None:
        return model.AttestationPolicy()
    path = _join(path, "attestation")
    att = _mapping(fields["attestation"], path, allowed={"mode", "tolerate", "ignore_advisories"})
    mode = _optional(att, "mode", path, _string) or model.MODE_HARDWARE
    if mode not in model.ATTESTATION_MODES:
        raise PolicyError(
            f"unknown mode {mode!r}; expected one of {', '.join(model.ATTESTATION_MODES)}",
            _join(path, "mode"),
        )
    tolerate: list[str] = []
    tolerate_path = _join(path, "tolerate")
    for i, item in enumerate(_list(att.get("tolerate"), tolerate_path)):
        item_path = f"{tolerate_path}[{i}]"
        text = _string(item, item_path)
        if text not in model.TOLERATIONS:
            raise PolicyError(
                f"unknown toleration {text!r}; expected one of {', '.join(model.TOLERATIONS)}",
                item_path,
            )
        if text in tolerate:
            raise PolicyError(f"duplicate toleration {text!r}", item_path)
        tolerate.append(text)
    advisories: list[str] = []
    ignore_all = False
    ignore = att.get("ignore_advisories")
    ignore_path = _join(path, "ignore_advisories")
    if ignore == "*":
        if "debug-mode" not in tolerate:
            raise PolicyError(
                "ignore_advisories: '*' is allowed only together with tolerate: [debug-mode]",
                ignore_path,
            )
        ignore_all = True
    else:
        for i, item in enumerate(_list(ignore, ignore_path)):
            text = _string(item, f"{ignore_path}[{i}]")
            if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", text):
                raise PolicyError(f"invalid advisory id {text!r}", f"{ignore_path}[{i}]")
            if text not in advisories:
                advisories.append(text)
    return model.AttestationPolicy(
        mode=mode,
        tolerate=tuple(sorted(tolerate)),
        ignore_advisories=tuple(sorted(advisories)),
        ignore_all_advisories=ignore_all,
    )


# Cross-checks ------------------------------------------------------------------------


def _check_unique(session: model.Session) -> None:
    sections: tuple[tuple[str, Sequence[Any]], ...] = (
        ("services", session.services),
        ("images", session.images),
        ("volumes", session.volumes),
        ("secrets", session.secrets),
    )
    for section, items in sections:
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                raise PolicyError(f"duplicate name {item.name!r}", f"{section}[{i}].name")
            seen.add(item.name)


def _check_references(session: model.Session) -> None:
    secrets = {secret.name: secret for secret in session.secrets}
    images = {image.name for image in session.images}
    volumes = {volume.name for volume in session.volumes}

    for i, service in enumerate(session.services):
        path = f"services[{i}]"
        if service.image_name is not None and service.image_name not in images:
            raise PolicyError(
                f"image {service.image_name!r} is not defined in images", f"{path}.image_name"
            )
        for j, word in enumerate(service.command):
            _check_variables(word, f"{path}.command[{j}]", secrets)
        for key, item in service.environment.items():
            _check_variables(item, f"{path}.environment.{key}", secrets)

    for i, image in enumerate(session.images):
        for j, injected in enumerate(image.injection_files):
            _check_variables(injected.content, f"images[{i}].injection_files[{j}].content", secrets)
        for j, mount in enumerate(image.volumes):
            if mount.name not in volumes:
                raise PolicyError(
                    f"volume {mount.name!r} is not defined in volumes",
                    f"images[{i}].volumes[{j}].name",
                )

    for i, secret in enumerate(session.secrets):
        path = f"secrets[{i}]"
        if secret.private_key is not None:
            target = secrets.get(secret.private_key)
            if target is None or target.kind != "private-key":
                raise PolicyError(
                    f"private_key {secret.private_key!r} must name a private-key secret",
                    f"{path}.private_key",
                )
        if secret.issuer is not None:
            target = secrets.get(secret.issuer)
            if target is None or target.kind != "x509-ca":
                raise PolicyError(
                    f"issuer {secret.issuer!r} must name an x509-ca secret", f"{path}.issuer"
                )
    _check_issuer_cycles(session)


def _check_issuer_cycles(session: model.Session) -> None:
    issuers = {s.name: s.issuer for s in session.secrets}
    for i, secret in enumerate(session.secrets):
        seen = {secret.name}
        current = secret.issuer
        while current is not None:
            if current in seen:
                raise PolicyError(
                    f"issuer chain of {secret.name!r} is a cycle", f"secrets[{i}].issuer"
                )
            seen.add(current)
            current = issuers.get(current)


def _check_variables(text: str, path: str, secrets: Mapping[str, model.SecretDefinition]) -> None:
    try:
        references = list(find_references(text))
    except MalformedVariable as exc:
        raise PolicyError(
            f"malformed $$SCONE:: variable at offset {exc.offset}; write "
            "$$SCONE::name$$ or $$SCONE::name:format$$",
            path,
        ) from None
    for reference in references:
        secret = secrets.get(reference.name)
        if secret is None:
            raise PolicyError(f"secret {reference.name!r} is not defined in secrets", path)
        if reference.format not in FORMATS[secret.kind]:
            allowed = ", ".join(f for f in FORMATS[secret.kind] if f is not None)
            raise PolicyError(
                f"format {reference.format!r} is not available for {secret.kind} secret "
                f"{reference.name!r}; expected one of {allowed}",
                path,
            )
