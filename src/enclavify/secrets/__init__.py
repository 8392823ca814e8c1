"""Secret values: generation of keys, certificates and random strings, and their rendering.

:class:`SecretValue` holds one value and never shows it in ``repr`` or errors.
"""

from enclavify.secrets.value import FORMATS, SecretValue

__all__ = ["FORMATS", "SecretValue"]
