"""bwta-compiler: a torch.compile backend and kernel generator for BWTA binarized transformers.

Importing this package never imports cuda-python or onnx (those load lazily when used).
"""

from __future__ import annotations

from . import config, formats, ops, reference  # noqa: F401  (registers the bwta:: custom ops)
from .modules import (AttentionCore, BinaryActQuantizer, BoolQuantizer, BWTAAttention, BWTALinear,
                      BWTAMultiheadAttention, TernaryQuantizer)
from .ops import binarize, boolize, ternarize
from .quantize import QuantConfig, quantize, report_lines

__version__ = "0.1.0"

__all__ = [
    "AttentionCore", "BWTAAttention", "BWTALinear", "BWTAMultiheadAttention", "BinaryActQuantizer",
    "BoolQuantizer", "QuantConfig", "TernaryQuantizer", "binarize", "boolize", "config", "quantize",
    "report_lines", "ternarize", "__version__",
]
