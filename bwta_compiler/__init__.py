"""bwta-compiler: a torch.compile backend and kernel generator for BWTA binarized transformers.

Importing this package never imports cuda-python or onnx (those load lazily when used).
"""

from __future__ import annotations

from . import config, formats, ops, reference  # noqa: F401  (registers the bwta:: custom ops)
from .freeze import freeze, state_dict_bytes
from .modules import (
    AttentionCore,
    BinaryActQuantizer,
    BoolQuantizer,
    BWTAAttention,
    BWTALinear,
    BWTAMultiheadAttention,
    TernaryQuantizer,
)
from .ops import binarize, boolize, ternarize
from .quantize import QuantConfig, quantize, report_lines
from .report import last_report, reset_reports

__version__ = "0.1.0"

__all__ = [
    "AttentionCore", "BWTAAttention", "BWTALinear", "BWTAMultiheadAttention", "BinaryActQuantizer",
    "BoolQuantizer", "QuantConfig", "TernaryQuantizer", "binarize", "boolize", "compile_onnx", "config",
    "freeze", "last_report", "load_compiled", "quantize", "report_lines", "reset_reports", "save_compiled",
    "state_dict_bytes", "ternarize", "__version__",
]


def __getattr__(name: str):
    # ONNX support loads lazily so that importing bwta_compiler never imports onnx.
    if name == "compile_onnx":
        from .onnx import compile_onnx

        return compile_onnx
    if name in ("save_compiled", "load_compiled"):  # torch's ahead-of-time machinery, loaded when used
        from . import precompile

        return getattr(precompile, name)
    raise AttributeError(f"module 'bwta_compiler' has no attribute {name!r}")
