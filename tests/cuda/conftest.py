"""GPU tests: skipped unless torch sees a CUDA device and the CUDA driver initialises."""

from __future__ import annotations

import pytest
import torch


def _gpu_ok() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    try:
        from bwta_compiler.runtime import cuda as rcuda
    except ImportError as e:
        return False, f"bwta CUDA runtime not importable: {e}"
    if not rcuda.available():
        return False, "cuInit failed (no CUDA driver / device)"
    return True, ""


_OK, _WHY = _gpu_ok()


def pytest_collection_modifyitems(config, items):
    if _OK:
        return
    skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU: {_WHY}")
    for item in items:
        if "/tests/cuda/" in str(item.fspath):
            item.add_marker(skip)
