"""Test-wide setup: a private kernel cache per test session, and GPU tests auto-skipped."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Point the kernel cache at a throwaway directory before anything reads the config.
_CACHE = tempfile.mkdtemp(prefix="bwta-test-cache-")
os.environ.setdefault("BWTA_CACHE_DIR", _CACHE)
os.environ.setdefault("BWTA_VERIFY", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    # Fresh random inputs per test, but reproducible when a failure must be replayed.
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none found)")
    for item in items:
        if "cuda" in item.keywords or "/tests/cuda/" in str(item.fspath):
            item.add_marker(skip)
