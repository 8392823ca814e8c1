"""Daemonless OCI image I/O: references, reading, the merged file system and building.

    ref = parse_reference("oci:/tmp/layout:latest")
    with open_image(ref, workdir=Path("/tmp/work")) as source:
        files = source.filesystem()
        builder = ImageBuilder(source)
        for layer in source.layers:
            builder.copy_layer_without(layer, ["/app"])
        builder.add_layer(fill, created_by="...")
        builder.config = source.config.replace(cmd=["/bin/true"])
        digest = builder.commit("docker-archive:/tmp/out.tar:app:1")

Transports are listed in :mod:`enclavify.image.reference`; the rules for hostile layer
entries in :mod:`enclavify.image.tarindex`; the merge rules in
:mod:`enclavify.image.filesystem`.
"""

from enclavify.image.builder import BuiltImage, ImageBuilder, LayerWriter, OutputLayer
from enclavify.image.filesystem import FileEntry, MergedFilesystem
from enclavify.image.model import ImageConfig, Platform
from enclavify.image.reference import ImageReference, parse_reference
from enclavify.image.source import Layer, SourceImage, open_image

__all__ = [
    "BuiltImage",
    "FileEntry",
    "ImageBuilder",
    "ImageConfig",
    "ImageReference",
    "Layer",
    "LayerWriter",
    "MergedFilesystem",
    "OutputLayer",
    "Platform",
    "SourceImage",
    "open_image",
    "parse_reference",
]
