"""NumPy implementations of the ``ai.bwta`` ops for ``onnx.reference.ReferenceEvaluator``: a second
oracle, independent of torch, for files written by :func:`bwta_compiler.onnx.export`.

``evaluator(path)`` returns a ``ReferenceEvaluator`` that knows the domain.  The arithmetic follows
bwta_compiler/ops.py: thresholds in fp32 rounded to the activation dtype, integer accumulation, then
``float(acc) * scale + bias`` in fp32 (two roundings).  ``BinaryCode`` takes row means with NumPy's
summation order, so it can differ from torch in the last bit of ``alpha`` (and in a code whose
weight equals its row mean to the last bit); every other op is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from .schemas import DOMAIN

_NP_OUT = {1: np.float32, 10: np.float16, 11: np.float64}


def ternary_codes(x: np.ndarray, s: np.ndarray, levels: int = 1) -> np.ndarray:
    s32 = np.float32(np.asarray(s, np.float32).reshape(()))
    out = np.zeros_like(x)
    for j in range(1, levels + 1):
        t = x.dtype.type(np.float32(j - 0.5) * s32)
        out = out + (x > t).astype(x.dtype) - (-x > t).astype(x.dtype)
    return out


def bool_codes(x: np.ndarray, s: np.ndarray, b: np.ndarray, levels: int = 1) -> np.ndarray:
    s32 = np.float32(np.asarray(s, np.float32).reshape(()))
    b32 = np.float32(np.asarray(b, np.float32).reshape(()))
    out = np.zeros_like(x)
    for j in range(1, levels + 1):
        t = x.dtype.type(b32 + np.float32(j - 0.5) * s32)
        out = out + (x > t).astype(x.dtype)
    return out


def sign_codes(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, 1, -1).astype(x.dtype)


def unpack_binary(words: np.ndarray, k: int) -> np.ndarray:
    """int32 words [N, Kw] (LSB-first, bit 1 = -1) -> {-1,+1} float64 [N, K]."""
    w = words.astype(np.int64) & 0xFFFFFFFF
    bits = (w[..., None] >> np.arange(32, dtype=np.int64)) & 1
    bits = bits.reshape(*words.shape[:-1], words.shape[-1] * 32)[..., :k]
    return 1.0 - 2.0 * bits


class TernaryCode(OpRun):
    op_domain = DOMAIN

    def _run(self, x, s, levels=None):
        return (ternary_codes(x, s, levels or 1),)


class BoolCode(OpRun):
    op_domain = DOMAIN

    def _run(self, x, s, b, levels=None):
        return (bool_codes(x, s, b, levels or 1),)


class SignCode(OpRun):
    op_domain = DOMAIN

    def _run(self, x, s):
        return (sign_codes(x),)


class BinaryCode(OpRun):
    op_domain = DOMAIN

    def _run(self, w):
        d = w - w.mean(-1, keepdims=True, dtype=w.dtype)
        codes = np.where(d >= 0, 1, -1).astype(w.dtype)
        return codes, np.abs(d.astype(np.float32)).mean(-1, dtype=np.float32)


class Linear(OpRun):
    op_domain = DOMAIN

    def _run(self, x, s, b, wp, scale, bias=None, act=None, k=None, pad_bits=None, out_dtype=None):
        if act == "ternary":
            cx = ternary_codes(x, s)
        elif act == "bool":
            cx = bool_codes(x, s, b)
        else:
            cx = sign_codes(x)
        cw = unpack_binary(wp, int(k))
        acc = cx.astype(np.float64).reshape(-1, int(k)) @ cw.T          # exact integers
        y = acc.astype(np.float32) * scale.astype(np.float32)
        if bias is not None:
            y = y + bias.astype(np.float32)
        y = y.astype(_NP_OUT.get(out_dtype or 1, np.float32))
        return (y.reshape(*x.shape[:-1], wp.shape[0]),)


OPS = [TernaryCode, BoolCode, SignCode, BinaryCode, Linear]


def evaluator(model: Any, **kwargs: Any) -> ReferenceEvaluator:
    """``ReferenceEvaluator(model, new_ops=[ai.bwta ops])`` (a path, a ModelProto or bytes)."""
    return ReferenceEvaluator(model, new_ops=OPS, **kwargs)


__all__ = ["OPS", "bool_codes", "evaluator", "sign_codes", "ternary_codes", "unpack_binary"]
