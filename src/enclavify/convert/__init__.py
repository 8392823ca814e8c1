"""The conversion pipeline: a native image in, a confidential image and its result file out.

Public surface:

    ConvertOptions, ConversionResult, convert_image(options, *, progress) -> ConversionResult
    inspect_image(reference, *, platform, temp_dir) -> Inspection
    parse_size(text, *, option, bounds), default_result_path(destination)

The modules: :mod:`.options` (checks that need no image), :mod:`.regions` (checks against the
image's files), :mod:`.sealing` (the ciphertext layer), :mod:`.runtimelayer` (the launcher's
runtime and ``runtime.json``), :mod:`.imageconfig` (config and history), :mod:`.result` (the
result file), :mod:`.pipeline` (the steps in order) and :mod:`.inspection`.
"""

from __future__ import annotations

from .inspection import Inspection, inspect_image
from .options import (
    HEAP_RANGE,
    STACK_RANGE,
    ConvertOptions,
    default_result_path,
    parse_size,
)
from .pipeline import ConversionResult, convert_image

__all__ = [
    "HEAP_RANGE",
    "STACK_RANGE",
    "ConversionResult",
    "ConvertOptions",
    "Inspection",
    "convert_image",
    "default_result_path",
    "inspect_image",
    "parse_size",
]
