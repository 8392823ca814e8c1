"""The conversion pipeline: a native image in, a confidential image and its result file out.

Steps, in order:

1. Check the options (no image needed), open the source image, check every ``--dir``,
   ``--plain`` and ``--binary`` against its file system and list what will be protected.
2. Rewrite every native layer without the protected directories (their plaintext is absent
   from the output's blobs, not merely whited out), in a worker thread that starts as soon
   as the image is open, while this one does the checks of step 1, builds the launcher's
   runtime and does steps 3 and 4. Until step 5 only the scratch directory is written.
3. Seal the protected entries into one added layer under ``/.enclavify``.
4. Add the runtime as a second layer under ``/opt/enclavify`` and compute the measurement
   over it, the binary, the fspf and the heap, stack and dlopen settings.
5. Write the result file to a temporary name, commit the image atomically, then publish the
   result file. A failure before the commit leaves neither image nor result file; the scratch
   directory is always removed.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclavify.attest import measurement
from enclavify.image import (
    ImageBuilder,
    LayerWriter,
    MergedFilesystem,
    OutputLayer,
    SourceImage,
    open_image,
    parse_reference,
)
from enclavify.image.reference import DOCKER_ARCHIVE, ENGINE
from enclavify.progress import Progress, format_bytes
from enclavify.protect import SealedVolume

from . import imageconfig, regions, runtimelayer
from .options import FSPF_PATH, CheckedOptions, ConvertOptions, check_options
from .result import PendingResult
from .sealing import sealed_total, write_sealed_layer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConversionResult:
    """Outcome of a conversion. ``fspf_key`` is secret, so it is kept out of ``repr``."""

    image: str
    digest: str
    result_path: Path
    measurement: str
    fspf_key: bytes = field(repr=False)
    fspf_tag: bytes
    protected: tuple[str, ...]
    plain: tuple[str, ...]
    service: dict[str, Any]
    exposed_ports: tuple[str, ...]
    runtime: dict[str, Any]

    def to_document(self) -> dict[str, Any]:
        """Return the result file's JSON document (it contains the fspf key)."""
        return _result_document(
            image=self.image,
            service=self.service,
            volume_key=self.fspf_key,
            volume_tag=self.fspf_tag,
            measurement_hex=self.measurement,
            protected=self.protected,
            plain=self.plain,
            exposed_ports=self.exposed_ports,
            runtime=self.runtime,
        )


def _result_document(
    *,
    image: str,
    service: dict[str, Any],
    volume_key: bytes,
    volume_tag: bytes,
    measurement_hex: str,
    protected: Sequence[str],
    plain: Sequence[str],
    exposed_ports: Sequence[str],
    runtime: dict[str, Any],
) -> dict[str, Any]:
    return {
        "image": image,
        "service": service,
        "fspf_path": FSPF_PATH,
        "fspf_key": volume_key.hex(),
        "fspf_tag": volume_tag.hex(),
        "measurement": measurement_hex,
        "protected": list(protected),
        "plain": list(plain),
        "exposed_ports": list(exposed_ports),
        "runtime": runtime,
    }


def convert_image(options: ConvertOptions, *, progress: Progress | None = None) -> ConversionResult:
    """Convert ``options.source`` into a confidential image at ``options.destination``.

    Raises:
        UsageError: an option is invalid or does not fit the image (checked before anything
            is written).
        ImageError: the source cannot be read or the destination cannot be written.
        ProtectError: sealing failed.
    """
    progress = progress or Progress()
    checked = check_options(options)
    if options.dlopen == 2:
        log.warning(
            "dlopen 2 lets the program load any shared library at run time; it is meant for "
            "debugging (pass --dlopen 0 or 1 for production)"
        )
    with ExitStack() as stack:
        scratch = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="enclavify-convert-", dir=options.temp_dir)
        )
        work = Path(scratch)
        progress.step(f"Opening {options.source}")
        reporter = progress.reporter()
        source = stack.enter_context(
            open_image(
                options.source, platform=options.platform, workdir=work / "source",
                progress=reporter,
            )
        )
        reporter.close()
        base = None
        if options.base is not None:
            progress.step(f"Opening the base image {options.base}")
            # The runtime must run on the source's platform, so the base is opened for it.
            base = stack.enter_context(
                open_image(
                    options.base, platform=str(source.platform), workdir=work / "base",
                    progress=reporter,
                )
            )
            reporter.close()
        return _convert_opened(checked, source, base, work, progress)
    raise AssertionError("unreachable")


def _convert_opened(
    checked: CheckedOptions,
    source: SourceImage,
    base: SourceImage | None,
    work: Path,
    progress: Progress,
) -> ConversionResult:
    options = checked.options
    filesystem = source.filesystem()
    runtime_files: MergedFilesystem = base.filesystem() if base is not None else filesystem
    runtime_source = f"base image {options.base}" if base is not None else "the image itself"
    builder = ImageBuilder(source, compression=checked.compression)

    # --- steps 1 to 4, side by side: a worker thread rewrites the native layers without the
    # protected directories (step 2) from the start, since it needs only the --dir paths.
    # Meanwhile this thread checks the request against the image, builds the runtime, seals
    # the protected files into the ciphertext layer and writes the runtime layer. Hashing
    # and encryption release the GIL, so each thread gets a core. The rewrite writes only to
    # the scratch directory, and if this thread fails (a --dir that is not in the image, an
    # image without Python and no --base), it stops the rewrite before raising.
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="enclavify-rewrite") as pool:
        rewriting = pool.submit(_rewrite_native_layers, builder, checked.protected, stop)
        try:
            inventory = _check_request(checked, filesystem, progress)
            progress.step("Building the runtime")
            built = runtimelayer.build(
                runtime_files,
                work / "runtime",
                source=runtime_source,
                cache_dir=options.runtime_cache,
                settings=runtimelayer.RuntimeSettings(
                    binary=checked.binary,
                    heap=options.heap,
                    stack=options.stack,
                    dlopen=options.dlopen,
                    regions=checked.protected,
                    plain=checked.plain,
                    cas_address=options.cas_address,
                    cas_certificate=options.cas_certificate,
                    cas_fingerprint=checked.cas_fingerprint,
                    config_id=options.config_id,
                    user=source.config.user,
                ),
            )
            sealed_layer, volume = _make_sealed_layer(
                builder, filesystem, checked, inventory, progress
            )

            # --- step 4: the measurement and the runtime layer
            measured = measurement.compute(
                runtime_digest=built.digest,
                binary=checked.binary,
                binary_digest=measurement.binary_digest(
                    filesystem, checked.binary, checked.protected
                ),
                fspf_digest=hashlib.sha256(volume.fspf).hexdigest(),
                heap=options.heap,
                stack=options.stack,
                dlopen=options.dlopen,
            )
            log.debug("measurement %s", measured)
            runtime_layer = builder.make_layer(
                lambda writer: runtimelayer.write_layer(writer, built, filesystem),
                created_by="enclavify: launcher runtime",
            )
        except BaseException:
            stop.set()
            raise
        rewritten = rewriting.result()
    for index, was_rewritten in enumerate(rewritten, start=1):
        progress.step(
            f"Layer {index}/{len(rewritten)}: "
            + ("rewritten without the protected directories" if was_rewritten else "kept as it is")
        )
    # The native history can spell out build commands and ENV values; none of it is kept.
    neutral = imageconfig.neutral_history(source.history, len(rewritten))
    for output_layer, entry in zip(builder.layers, neutral, strict=True):
        output_layer.history = [entry]
    builder.append(sealed_layer)
    builder.append(runtime_layer)

    # --- step 5: configuration, history, result file and commit
    builder.config = imageconfig.confidential_config(
        source.config,
        entrypoint=built.entrypoint,
        runtime_version=built.version,
        measurement=measured,
        regions=checked.protected,
        plain=checked.plain,
    )
    service = {
        "command": imageconfig.original_command(source.config),
        "environment": imageconfig.original_environment(source.config),
        "pwd": source.config.working_dir or "/",
    }
    exposed_ports = tuple(source.config.exposed_ports)
    document = _result_document(
        image=options.destination,
        service=service,
        volume_key=volume.key,
        volume_tag=volume.tag,
        measurement_hex=measured,
        protected=checked.protected,
        plain=checked.plain,
        exposed_ports=exposed_ports,
        runtime=built.info,
    )
    pending = PendingResult(checked.result_path, document)
    try:
        progress.step(f"Writing {options.destination}")
        reporter = progress.reporter()
        digest = builder.commit(options.destination, progress=reporter)
        reporter.close()
    except BaseException:
        pending.discard()
        raise
    pending.publish()
    if parse_reference(options.destination).transport in (DOCKER_ARCHIVE, ENGINE):
        # Engines store a manifest of their own, so the ID they list is the one to show.
        progress.step(f"Wrote {options.destination} (image ID {builder.config_digest})")
    else:
        progress.step(f"Wrote {options.destination} ({digest})")
    return ConversionResult(
        image=options.destination,
        digest=digest,
        result_path=checked.result_path,
        measurement=measured,
        fspf_key=volume.key,
        fspf_tag=volume.tag,
        protected=checked.protected,
        plain=checked.plain,
        service=service,
        exposed_ports=exposed_ports,
        runtime=built.info,
    )


def _check_request(
    checked: CheckedOptions, filesystem: MergedFilesystem, progress: Progress
) -> regions.Inventory:
    """Check the request against the image and list what will be protected (step 1).

    Raises:
        UsageError: the image is confidential already, or a ``--dir``, ``--plain`` or
            ``--binary`` does not fit it.
    """
    regions.check_not_confidential(filesystem)
    for region in checked.protected:
        regions.check_directory(filesystem, region, option="--dir")
    for directory in checked.plain:
        regions.check_directory(filesystem, directory, option="--plain")
    regions.check_binary(filesystem, checked.binary)
    inventory = regions.take_inventory(filesystem, checked.protected)
    count = len(checked.protected)
    progress.step(
        f"Protecting {count} {'directory' if count == 1 else 'directories'}: "
        f"{inventory.file_count} files, {format_bytes(inventory.plain_bytes)}"
    )
    return inventory


def _rewrite_native_layers(
    builder: ImageBuilder, protected: Sequence[str], stop: threading.Event
) -> list[bool]:
    """Add every source layer to ``builder`` without ``protected``.

    Returns, for each layer, whether it was rewritten (or else copied as it is).
    """
    return [
        builder.copy_layer_without(layer, list(protected), stop=stop)
        for layer in builder.source.layers
    ]


def _make_sealed_layer(
    builder: ImageBuilder,
    filesystem: MergedFilesystem,
    checked: CheckedOptions,
    inventory: regions.Inventory,
    progress: Progress,
) -> tuple[OutputLayer, SealedVolume]:
    """Write the ciphertext layer (not yet added to ``builder``) and return it with its volume."""
    sealed: list[SealedVolume] = []
    total = sealed_total(filesystem, inventory, checked.protected)

    def fill(writer: LayerWriter) -> None:
        # The total is the pack's size: the plaintext plus a 16-byte tag per 64 KiB chunk.
        with progress.task("Encrypting protected files into the pack", total=total) as task:
            sealed.append(
                write_sealed_layer(writer, filesystem, inventory, checked.protected, task=task)
            )

    # Ciphertext does not compress, so the layer is a plain tar. That saves the compressor's
    # time on every protected byte, and one hash serves as both blob digest and diff_id.
    layer = builder.make_layer(
        fill, created_by="enclavify: protected file system", compressed=False
    )
    return layer, sealed[0]
