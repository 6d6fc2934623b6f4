"""ONNX frontend: import an ONNX model as an FX graph, export BWTA models with the ``ai.bwta``
domain, and compile an ONNX file with the ``bwta`` backend.

Importing this package imports ``onnx`` (``import bwta_compiler`` does not)."""

from __future__ import annotations

import os
from typing import Any, Union

from .export import PackedBWTALinear, export
from .importer import import_model


def compile_onnx(path: Union[str, os.PathLike, Any], quantize: Any = None, **options: Any):
    """Import ``path`` (see :func:`import_model`; ``quantize=True`` or a ``QuantConfig`` quantizes a
    float model's linear layers with :func:`bwta_compiler.quantize` semantics) and return
    ``torch.compile(module, backend="bwta", options=options)``: the same pipeline as any torch
    model, with no ONNX-specific passes."""
    import torch

    gm = import_model(path, quantize=quantize)
    compiled = torch.compile(gm, backend="bwta", options=options or None)
    return compiled


__all__ = ["PackedBWTALinear", "compile_onnx", "export", "import_model"]
