"""enclavify: turn an ordinary container image into a confidential one.

The package is split by component; ``docs/architecture.md`` is the map:

- ``image``: OCI images, transports and safe layer handling.
- ``protect``: the protected file system (sealed directory trees and their fspf).
- ``policy``: sessions, templates and rendering.
- ``secrets``: generating secret values.
- ``attest``: evidence, measurement and verifiers.
- ``cas``: the configuration and attestation service and its one client.
- ``runtime``: the launcher that runs inside a confidential image.
- ``convert``: the pipeline that ties them together.
- ``cli``: command-line front ends.

Modules that the launcher carries into an image (``errors``, ``protect`` unsealing,
``attest`` evidence and measurement, ``cas.client``, ``runtime``) use only the standard
library and run on Python 3.8 or newer, because they execute under the image's own interpreter.
"""

__version__ = "0.1.0"
