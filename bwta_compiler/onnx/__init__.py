"""ONNX frontend: import an ONNX model as an FX graph, export BWTA models with the ``ai.bwta``
domain, and compile an ONNX file with the ``bwta`` backend.

Attributes load lazily: ``import bwta_compiler.onnx`` (or ``bwta_compiler.onnx.cli``) does not
import ``onnx`` until a function that needs it is used."""

from __future__ import annotations

import importlib
import os
from typing import Any

_LAZY = {"import_model": "importer", "export": "exporter", "PackedBWTALinear": "exporter",
         "prepare_for_export": "exporter", "bwta_op_counts": "exporter"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compile_onnx(path: str | os.PathLike | Any, quantize: Any = None, **options: Any):
    """Import ``path`` (a file, a ``ModelProto`` or bytes; see :func:`import_model`) and return
    ``torch.compile(module, backend="bwta", options=options)``: the same pipeline as any torch model,
    with no ONNX-specific passes.  ``quantize=True`` or a :class:`~bwta_compiler.QuantConfig`
    quantizes a float model's linear layers with :func:`bwta_compiler.quantize` semantics first.
    ``options`` are bwta config options (``target``, ``debug_dir``, ``strict``, ...)."""
    import torch

    from .importer import import_model

    gm = import_model(path, quantize=quantize)
    return torch.compile(gm, backend="bwta", options=options or None)


__all__ = ["PackedBWTALinear", "bwta_op_counts", "compile_onnx", "export", "import_model", "prepare_for_export"]
