"""Secret values: generation of keys, certificates and random strings, and their rendering.

:class:`SecretValue` contains one value and never shows it in ``repr`` or errors.
:func:`generate_secrets` makes the values of a session's secrets, keeping earlier values
whose definition is unchanged.
"""

from enclavify.secrets.value import FORMATS, SecretValue  # isort: skip  (policy imports it)
from enclavify.secrets.generate import (
    definition_fingerprint,
    explicit_value,
    generate_secrets,
    new_private_key,
)

__all__ = [
    "FORMATS",
    "SecretValue",
    "definition_fingerprint",
    "explicit_value",
    "generate_secrets",
    "new_private_key",
]
