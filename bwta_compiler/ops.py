"""BWTA quantizer and packing ops, registered as ``torch.library`` custom ops in the ``bwta`` namespace.

Quantizer ops return **codes** (integer values stored in the input's float dtype) with a
straight-through backward; the fake-quantized value is ``code * scale`` (see :func:`ternarize`,
:func:`boolize`, :func:`binarize`).  Modules multiply the scales in *after* the MatMul on
codes, which is exact in integers, so the eager model computes ``float(acc) * (alpha * s) + bias``
exactly as the generated kernels do.

Code rules (thresholds computed once per tensor in fp32, then compared in the input dtype):

* ternary, ``levels = m``: ``code = sum_j [x > t_j] - [x < -t_j]``, ``t_j = (j - 1/2) * s``
  which equals ``clamp(round(x / s), -m, m)`` with ties going to zero.  m = 1 is the ternary
  activation ``+1 if x > s/2, -1 if x < -s/2, else 0``.
* bool, ``levels = m``: ``code = sum_j [x > b + (j - 1/2) * s]`` = ``clamp(round((x-b)/s), 0, m)``.
* binary weights: ``code = +1 if w >= mean_row(w) else -1``, ``alpha = mean_row |w - mean_row(w)|``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import formats

LIB = "bwta"


# ---- input checks (clear errors naming the tensor and the shapes) ---------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(name: str, t: Tensor, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"bwta::{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"bwta::{op}: {name} must be a floating tensor, got dtype {t.dtype} (shape {tuple(t.shape)})")


def check_scalar_scale(name: str, s: Tensor, op: str, positive: bool = True) -> None:
    check_float(name, s, op)
    if s.numel() != 1:
        raise ValueError(f"bwta::{op}: {name} must hold one value (a per-tensor scale), got shape {tuple(s.shape)}")
    if s.device.type != "meta":
        v = float(s.detach().reshape(()).float())
        if not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"bwta::{op}: {name} must be finite{' and > 0' if positive else ''}, got {v}")


def check_levels(levels: int, op: str) -> None:
    if not 1 <= levels <= 127:
        raise ValueError(f"bwta::{op}: levels must be in 1..127, got {levels}")


# ---- thresholds: the one definition shared by eager ops and generated kernels ----------------


def ternary_thresholds(s: Tensor, levels: int, dtype: torch.dtype) -> Tensor:
    """``t_j = (j - 1/2) * s`` for j = 1..levels, computed in fp32 and rounded to ``dtype``."""
    j = torch.arange(1, levels + 1, device=s.device, dtype=torch.float32) - 0.5
    return (j * s.detach().reshape(()).float()).to(dtype)


def bool_thresholds(s: Tensor, b: Tensor, levels: int, dtype: torch.dtype) -> Tensor:
    """``b + (j - 1/2) * s`` for j = 1..levels, computed in fp32 and rounded to ``dtype``."""
    j = torch.arange(1, levels + 1, device=s.device, dtype=torch.float32) - 0.5
    return (b.detach().reshape(()).float() + j * s.detach().reshape(()).float()).to(dtype)


def _sum_masks(masks, dtype: torch.dtype) -> Tensor:
    """How many of the boolean ``masks`` hold, elementwise, in ``dtype``."""
    masks = iter(masks)
    out = next(masks).to(dtype)
    for m in masks:
        out += m.to(dtype)
    return out


def _count_above(x: Tensor, thr: Tensor) -> Tensor:
    return _sum_masks((x > t for t in thr), x.dtype)


def _count_below(x: Tensor, thr: Tensor) -> Tensor:
    # x < -t is exactly -x > t (negation is exact), without materialising -x.
    return _sum_masks((x < -t for t in thr), x.dtype)


def ternary_code_eager(x: Tensor, s: Tensor, levels: int = 1) -> Tensor:
    thr = ternary_thresholds(s, levels, x.dtype)
    return _count_above(x, thr) - _count_below(x, thr)


def bool_code_eager(x: Tensor, s: Tensor, b: Tensor, levels: int = 1) -> Tensor:
    return _count_above(x, bool_thresholds(s, b, levels, x.dtype))


def binary_code_eager(w: Tensor) -> tuple[Tensor, Tensor]:
    d = w - w.mean(-1, keepdim=True)
    code = torch.where(d >= 0, 1.0, -1.0).to(w.dtype)
    alpha = d.float().abs().mean(-1)
    return code, alpha


# ---- quantizer custom ops --------------------------------------------------------------------


@torch.library.custom_op(f"{LIB}::ternary_code", mutates_args=())
def ternary_code(x: Tensor, s: Tensor, levels: int = 1) -> Tensor:
    """Ternary (2*levels+1)-level codes of ``x`` with per-tensor scale ``s``."""
    check_float("x", x, "ternary_code")
    check_scalar_scale("s", s, "ternary_code")
    check_levels(levels, "ternary_code")
    return ternary_code_eager(x, s, levels)


@ternary_code.register_fake
def _(x: Tensor, s: Tensor, levels: int = 1) -> Tensor:
    return torch.empty_like(x)


def _ternary_setup(ctx, inputs, output) -> None:
    x, s, levels = inputs
    ctx.save_for_backward(x, s)
    ctx.levels = levels


def _ternary_backward(ctx, grad: Tensor):
    # Straight-through with clipping to the active range; d code/d s = -x/s^2 inside (LSQ).
    x, s = ctx.saved_tensors
    sf = s.float().reshape(())
    u = x.float() / sf
    inside = (u >= -ctx.levels) & (u <= ctx.levels)
    g = grad.float() * inside
    grad_x = (g / sf).to(x.dtype)
    grad_s = (-(g * u).sum() / sf).reshape(s.shape).to(s.dtype)
    return grad_x, grad_s, None


ternary_code.register_autograd(_ternary_backward, setup_context=_ternary_setup)


@torch.library.custom_op(f"{LIB}::bool_code", mutates_args=())
def bool_code(x: Tensor, s: Tensor, b: Tensor, levels: int = 1) -> Tensor:
    """Bool (levels+1)-level codes ``clamp(round((x - b) / s), 0, levels)`` of a non-negative tensor."""
    check_float("x", x, "bool_code")
    check_scalar_scale("s", s, "bool_code")
    check_scalar_scale("b", b, "bool_code", positive=False)
    check_levels(levels, "bool_code")
    return bool_code_eager(x, s, b, levels)


@bool_code.register_fake
def _(x: Tensor, s: Tensor, b: Tensor, levels: int = 1) -> Tensor:
    return torch.empty_like(x)


def _bool_setup(ctx, inputs, output) -> None:
    x, s, b, levels = inputs
    ctx.save_for_backward(x, s, b)
    ctx.levels = levels


def _bool_backward(ctx, grad: Tensor):
    x, s, b = ctx.saved_tensors
    sf = s.float().reshape(())
    u = (x.float() - b.float().reshape(())) / sf
    inside = (u >= 0) & (u <= ctx.levels)
    g = grad.float() * inside
    grad_x = (g / sf).to(x.dtype)
    grad_s = (-(g * u).sum() / sf).reshape(s.shape).to(s.dtype)
    grad_b = (-g.sum() / sf).reshape(b.shape).to(b.dtype)
    return grad_x, grad_s, grad_b, None


bool_code.register_autograd(_bool_backward, setup_context=_bool_setup)


def sign_code_eager(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


@torch.library.custom_op(f"{LIB}::sign_code", mutates_args=())
def sign_code(x: Tensor, s: Tensor) -> Tensor:
    """Binary activation codes ``+1 if x >= 0 else -1`` (the plain-binarization baseline)."""
    check_float("x", x, "sign_code")
    check_scalar_scale("s", s, "sign_code")
    return sign_code_eager(x)


@sign_code.register_fake
def _(x: Tensor, s: Tensor) -> Tensor:
    return torch.empty_like(x)


def _sign_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _sign_backward(ctx, grad: Tensor):
    # s * sign(x): d/ds flows only through the explicit scale, so d code/d s = 0; STE inside |x| <= s.
    x, s = ctx.saved_tensors
    sf = s.float().reshape(())
    inside = (x.float() / sf).abs() <= 1
    return (grad.float() * inside / sf).to(x.dtype), torch.zeros_like(s)


sign_code.register_autograd(_sign_backward, setup_context=_sign_setup)


@torch.library.custom_op(f"{LIB}::binary_code", mutates_args=())
def binary_code(w: Tensor) -> tuple[Tensor, Tensor]:
    """Binary weight codes ``sign(w - mean_row(w))`` (0 -> +1) and per-row scale ``alpha`` (fp32)."""
    check_float("weight", w, "binary_code")
    if w.dim() < 1 or w.shape[-1] == 0:
        raise ValueError(f"bwta::binary_code: weight must have a non-empty last dim (K), got {tuple(w.shape)}")
    return binary_code_eager(w)


@binary_code.register_fake
def _(w: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(w), w.new_empty(w.shape[:-1], dtype=torch.float32)


def _binary_setup(ctx, inputs, output) -> None:
    (w,) = inputs
    code, alpha = output
    ctx.save_for_backward(w, code, alpha)


def _binary_backward(ctx, grad_code: Tensor, grad_alpha: Tensor):
    # The fake-quantized weight is alpha * code; STE makes d(alpha*code)/dw the identity inside
    # |w - mean| <= 1, so d code/dw = 1/alpha there, plus the BWN term through alpha.
    w, code, alpha = ctx.saved_tensors
    d = w.float() - w.float().mean(-1, keepdim=True)
    inside = d.abs() <= 1.0
    a = alpha.clamp_min(1e-12).unsqueeze(-1)
    gw = torch.zeros_like(d)
    if grad_code is not None:
        gw = gw + grad_code.float() * inside / a
    if grad_alpha is not None:
        gw = gw + grad_alpha.float().unsqueeze(-1) * code.float() / w.shape[-1]
    return gw.to(w.dtype)


binary_code.register_autograd(_binary_backward, setup_context=_binary_setup)


@torch.library.custom_op(f"{LIB}::grad_scale", mutates_args=())
def grad_scale(x: Tensor, g: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``g`` (the LSQ step-size trick)."""
    return x.clone()


@grad_scale.register_fake
def _(x: Tensor, g: float) -> Tensor:
    return torch.empty_like(x)


def _grad_scale_setup(ctx, inputs, output) -> None:
    ctx.g = inputs[1]


grad_scale.register_autograd(lambda ctx, grad: (grad * ctx.g, None), setup_context=_grad_scale_setup)


# ---- fake-quantizers (the paper's formulas, composed from the code ops) ----------------------


def ternarize(x: Tensor, s: Tensor, levels: int = 1) -> Tensor:
    """``s * clamp(round(x / s), -levels, levels)`` with a straight-through backward."""
    return ternary_code(x, s, levels) * s.to(x.dtype)


def boolize(x: Tensor, s: Tensor, b: Tensor, levels: int = 1) -> Tensor:
    """``s * clamp(round((x - b) / s), 0, levels)`` with a straight-through backward."""
    return bool_code(x, s, b, levels) * s.to(x.dtype)


def binarize(w: Tensor) -> Tensor:
    """``alpha_row * sign(w - mean_row(w))`` with a straight-through backward."""
    code, alpha = binary_code(w)
    return code * alpha.unsqueeze(-1).to(w.dtype)


def lsq_init(x: Tensor, levels: int = 1) -> Tensor:
    """LSQ initial step size ``2 * mean|x| / sqrt(Qp)``, Qp = positive levels."""
    return (2 * x.detach().float().abs().mean() / math.sqrt(levels)).clamp_min(1e-8)


def lsq_grad_scale(numel: int, levels: int = 1) -> float:
    """LSQ gradient scale ``1 / sqrt(numel * Qp)``."""
    return 1.0 / math.sqrt(max(numel, 1) * levels)


# ---- packing ops -----------------------------------------------------------------------------


def _define_pack(kind: str, pack_fn, planes: int, doc: str):
    """One packing op ``bwta::pack_<kind>``: float codes [..., K] -> int32 words."""
    name = f"pack_{kind}"

    @torch.library.custom_op(f"{LIB}::{name}", mutates_args=())
    def pack(codes: Tensor, pad_bits: int = formats.DEFAULT_PAD_BITS) -> Tensor:
        check_float("codes", codes, name)
        return pack_fn(codes, pad_bits)

    @pack.register_fake
    def _(codes: Tensor, pad_bits: int = formats.DEFAULT_PAD_BITS) -> Tensor:
        plane_dims = (2,) if planes == 2 else ()
        shape = (*codes.shape[:-1], *plane_dims, formats.num_words(codes.shape[-1], pad_bits))
        return codes.new_empty(shape, dtype=torch.int32)

    pack.__doc__ = doc
    return pack


pack_binary = _define_pack("binary", formats.pack_binary_codes, 1, "{-1,+1} codes [..., K] -> int32 words [..., Kw].")
pack_ternary = _define_pack("ternary", formats.pack_ternary_codes, 2,
                            "{-1,0,+1} codes [..., K] -> int32 words [..., 2, Kw].")
pack_bool = _define_pack("bool", formats.pack_bool_codes, 1, "{0,1} codes [..., K] -> int32 words [..., Kw].")


@torch.library.custom_op(f"{LIB}::unpack_binary", mutates_args=())
def unpack_binary(words: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """int32 words [..., Kw] -> {-1,+1} codes [..., K] in ``dtype`` (used for folded weights)."""
    if words.dtype != torch.int32:
        raise TypeError(f"bwta::unpack_binary: words must be int32, got {words.dtype}")
    return formats.unpack_binary_codes(words, k, dtype)


@unpack_binary.register_fake
def _(words: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return words.new_empty((*words.shape[:-1], k), dtype=dtype)
