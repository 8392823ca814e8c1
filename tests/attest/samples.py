"""Locations of the public TEE evidence samples the attestation tests read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TEE_SAMPLES = Path(
    os.environ.get(
        "ENCLAVIFY_TEE_SAMPLES", Path(__file__).resolve().parents[3] / "shared/testdata/tee"
    )
)


def sample(relative: str) -> Path:
    """Return the path of a sample file, skipping the test when the sample set is absent."""
    path = TEE_SAMPLES / relative
    if not path.is_file():
        pytest.skip(f"TEE evidence sample {relative} not found under {TEE_SAMPLES}")
    return path
