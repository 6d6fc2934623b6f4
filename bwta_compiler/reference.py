"""Reference low-bit MatMuls on packed codes, and the fused ops the compiler emits.

``bwta::mm_bt | mm_tt | mm_ut | mm_bb`` compute ``out[..., m, n] = sum_k A[..., m, k] * B[..., n, k]``
from packed words with the XOR/AND + popcount identities (``acc_bt`` ... ``acc_bb``), then the epilogue
``float(acc) * scale + bias`` in fp32.  They are the oracles every generated kernel is tested
against (and they are tested against an integer matmul of the unpacked codes).

``bwta::linear`` and ``bwta::qbmm`` are the fused ops that the passes put into the graph:
quantize -> pack -> MatMul -> epilogue in one node.  When the backend has bound a generated
kernel (the ``kernel_id`` argument names it in :mod:`bwta_compiler.kernel_registry`), the op
launches it; otherwise it computes the same integers with a float GEMM on the codes (exact).
In compiled graphs the backend then retargets the node to the op's launch twin
(:mod:`bwta_compiler.launch_ops`), which calls the kernel without ``custom_op``'s per-call layers.
``linear_reference`` / ``qbmm_reference`` are the popcount oracles of both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import formats, kernel_registry
from .ops import LIB, bool_code_eager, check_float, check_scalar_scale, sign_code_eager, ternary_code_eager

# Bound on the [rows, N, Kw] int64 intermediate of the reference so big shapes do not blow memory.
_CHUNK_ELEMS = 1 << 24

VARIANTS = ("bt", "tt", "ut", "bb")


def _check_words(name: str, t: Tensor, op: str, planes: int) -> None:
    if t.dtype != torch.int32:
        raise TypeError(f"bwta::{op}: {name} must be packed int32 words, got dtype {t.dtype}")
    if planes == 2 and (t.dim() < 3 or t.shape[-2] != 2):
        raise ValueError(f"bwta::{op}: {name} must be ternary words [..., rows, 2, Kw], got {tuple(t.shape)}")
    if planes == 1 and t.dim() < 2:
        raise ValueError(f"bwta::{op}: {name} must be words [..., rows, Kw], got {tuple(t.shape)}")


def _check_k(op: str, k: int, a: Tensor, b: Tensor) -> None:
    kw_a, kw_b = a.shape[-1], b.shape[-1]
    if kw_a != kw_b:
        raise ValueError(f"bwta::{op}: packed K differs: A has {kw_a} words {tuple(a.shape)}, B has {kw_b} words {tuple(b.shape)}")
    if not 0 < k <= kw_a * formats.WORD_BITS:
        raise ValueError(f"bwta::{op}: K={k} does not fit the packed operands ({kw_a} words = {kw_a * 32} bits)")


def _pairwise_popc(a: Tensor, b: Tensor, op: str) -> Tensor:
    """sum_w popc(a[..., m, w] OP b[..., n, w]) -> [..., M, N] int64 (OP = 'xor' | 'and')."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    m, n, kw = a.shape[-2], b.shape[-2], a.shape[-1]
    rows = max(1, _CHUNK_ELEMS // max(1, n * kw * max(1, batch.numel())))
    out = []
    for i in range(0, m, rows):
        ai = a[..., i:i + rows, None, :]
        bj = b[..., None, :, :]
        mixed = torch.bitwise_xor(ai, bj) if op == "xor" else torch.bitwise_and(ai, bj)
        out.append(formats.popcount32(mixed).sum(-1))
    return torch.cat(out, dim=-2) if out else a.new_zeros((*batch, 0, n), dtype=torch.int64)


def acc_bt(a: Tensor, b: Tensor) -> Tensor:
    """Ternary A [..., M, 2, Kw] x binary B [..., N, Kw]: ``xpc(s,P) - xpc(s,N)`` (padding-safe)."""
    return _pairwise_popc(a[..., 0, :], b, "xor") - _pairwise_popc(a[..., 1, :], b, "xor")


def acc_tt(a: Tensor, b: Tensor) -> Tensor:
    """Ternary x ternary: ``apc(Pa,Pb) + apc(Na,Nb) - apc(Pa,Nb) - apc(Na,Pb)``."""
    pa, na, pb, nb = a[..., 0, :], a[..., 1, :], b[..., 0, :], b[..., 1, :]
    return (_pairwise_popc(pa, pb, "and") + _pairwise_popc(na, nb, "and")
            - _pairwise_popc(pa, nb, "and") - _pairwise_popc(na, pb, "and"))


def acc_ut(a: Tensor, b: Tensor) -> Tensor:
    """Bool A [..., M, Kw] x ternary B [..., N, 2, Kw]: ``apc(A,Pb) - apc(A,Nb)``."""
    return _pairwise_popc(a, b[..., 0, :], "and") - _pairwise_popc(a, b[..., 1, :], "and")


def acc_bb(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Binary x binary: ``K - 2 * xpc(a, b)`` with the true K."""
    return k - 2 * _pairwise_popc(a, b, "xor")


def epilogue(acc: Tensor, scale: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype | None) -> Tensor:
    """``float(acc) * scale + bias`` in fp32 (two roundings, in that order), then cast."""
    y = acc.to(torch.float32)
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or torch.float32)


def _mm_fake(a: Tensor, b: Tensor, a_planes: int, b_planes: int, out_dtype: torch.dtype | None) -> Tensor:
    a_rows = a.shape[:-1] if a_planes == 1 else a.shape[:-2]
    b_rows = b.shape[:-1] if b_planes == 1 else b.shape[:-2]
    batch = torch.broadcast_shapes(a_rows[:-1], b_rows[:-1])
    return a.new_empty((*batch, a_rows[-1], b_rows[-1]), dtype=out_dtype or torch.float32)


def _define_mm(variant: str, a_planes: int, b_planes: int, acc_fn):
    name = f"mm_{variant}"

    @torch.library.custom_op(f"{LIB}::{name}", mutates_args=())
    def mm(a: Tensor, b: Tensor, k: int, scale: Tensor | None = None, bias: Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> Tensor:
        _check_words("a", a, name, a_planes)
        _check_words("b", b, name, b_planes)
        _check_k(name, k, a, b)
        acc = acc_fn(a, b, k) if variant == "bb" else acc_fn(a, b)
        return epilogue(acc, scale, bias, out_dtype)

    @mm.register_fake
    def _(a, b, k, scale=None, bias=None, out_dtype=None):
        return _mm_fake(a, b, a_planes, b_planes, out_dtype)

    mm.__doc__ = f"Reference {variant.upper()} MatMul on packed codes with the fp32 epilogue."
    return mm


mm_bt = _define_mm("bt", 2, 1, acc_bt)
mm_tt = _define_mm("tt", 2, 2, acc_tt)
mm_ut = _define_mm("ut", 1, 2, acc_ut)
mm_bb = _define_mm("bb", 1, 1, acc_bb)


# ---- activation quantize + pack, as the fused ops do it ---------------------------------------

ACTS = ("ternary", "bool", "binary")


def quantize_pack(x: Tensor, act: str, s: Tensor, b: Tensor | None, pad_bits: int) -> Tensor:
    """Codes of ``x`` packed along the last dim: ternary -> [..., 2, Kw] (P, N planes);
    bool -> [..., Kw]; binary (sign) -> [..., Kw] with bit 1 = code -1."""
    if act == "ternary":
        return formats.pack_ternary_codes(ternary_code_eager(x, s), pad_bits)
    if act == "bool":
        return formats.pack_bool_codes(bool_code_eager(x, s, b), pad_bits)
    if act == "binary":
        return formats.pack_binary_codes(sign_code_eager(x), pad_bits)
    raise ValueError(f"unknown activation quantizer {act!r}; expected one of {ACTS}")


def act_codes(x: Tensor, act: str, s: Tensor, b: Tensor | None) -> Tensor:
    """Integer codes of ``x`` under activation quantizer ``act`` (same rules as quantize_pack)."""
    if act == "ternary":
        return ternary_code_eager(x, s)
    if act == "bool":
        return bool_code_eager(x, s, b)
    return sign_code_eager(x)


def _exact_matmul(a_codes: Tensor, b_codes: Tensor) -> Tensor:
    """Integer MatMul of codes through a float GEMM: exact while |sum| < 2^24 in fp32 (else fp64)."""
    dtype = torch.float32 if a_codes.shape[-1] < (1 << 24) else torch.float64
    return torch.matmul(a_codes.to(dtype), b_codes.to(dtype))


def _check_act(op: str, act: str, s: Tensor, b: Tensor | None) -> None:
    if act not in ACTS:
        raise ValueError(f"bwta::{op}: unknown activation quantizer {act!r}; expected one of {ACTS}")
    check_scalar_scale("s", s, op)
    if act == "bool":
        if b is None:
            raise ValueError(f"bwta::{op}: a bool quantizer needs its offset b")
        check_scalar_scale("b", b, op, positive=False)


def linear_reference(x: Tensor, s: Tensor, b: Tensor | None, act: str, w_packed: Tensor, k: int,
                     scale: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype | None,
                     pad_bits: int) -> Tensor:
    xp = quantize_pack(x.reshape(-1, k), act, s, b, pad_bits)
    if act == "ternary":
        acc = acc_bt(xp, w_packed)
    elif act == "bool":
        # A bool activation is a ternary one with an empty N plane: acc = xpc(s,A) - xpc(s,0) ... in
        # AND form: popc(A) - 2*apc(A, s).
        acc = _pairwise_popc(xp, torch.full_like(w_packed, -1), "and") - 2 * _pairwise_popc(xp, w_packed, "and")
    else:
        acc = acc_bb(xp, w_packed, k)
    y = epilogue(acc, scale, bias, out_dtype)
    return y.reshape(*x.shape[:-1], w_packed.shape[0])


@torch.library.custom_op(f"{LIB}::linear", mutates_args=())
def linear(x: Tensor, s: Tensor, b: Tensor | None, act: str, w_packed: Tensor, k: int,
           scale: Tensor | None = None, bias: Tensor | None = None,
           out_dtype: torch.dtype | None = None, pad_bits: int = formats.DEFAULT_PAD_BITS,
           kernel_id: str = "") -> Tensor:
    """Fused low-bit linear: quantize ``x`` [..., K] (``act``), pack, MatMul with the packed binary
    weight [N, Kw], then ``float(acc) * scale + bias``.  ``kernel_id`` names a generated kernel."""
    check_float("x", x, "linear")
    _check_act("linear", act, s, b)
    _check_words("w_packed", w_packed, "linear", 1)
    if x.shape[-1] != k:
        raise ValueError(f"bwta::linear: input K={x.shape[-1]} (shape {tuple(x.shape)}) does not match the packed "
                         f"weight's K={k} (w_packed {tuple(w_packed.shape)})")
    if w_packed.shape[-1] != formats.num_words(k, pad_bits):
        raise ValueError(f"bwta::linear: w_packed {tuple(w_packed.shape)} does not hold K={k} at pad_bits={pad_bits}")
    if kernel_id:
        return kernel_registry.get(kernel_id)(x, s, b, w_packed, scale, bias, out_dtype)
    # No generated kernel bound: the same integers through a float GEMM on codes (exact, and much
    # faster than the popcount oracle ``linear_reference``, which the tests compare kernels with).
    w = formats.unpack_binary_codes(w_packed, k, torch.float32)
    acc = _exact_matmul(act_codes(x, act, s, b), w.t())
    return epilogue(acc, scale, bias, out_dtype)


@linear.register_fake
def linear_fake(x, s, b, act, w_packed, k, scale=None, bias=None, out_dtype=None, pad_bits=64, kernel_id=""):
    # Pins a symbolic feature dim (e.g. an ONNX export with dynamic_shapes="auto") to the weight's K.
    torch._check(x.shape[-1] == k, lambda: f"bwta::linear: input K does not match the packed weight's K={k}")
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]), dtype=out_dtype or torch.float32)


QBMM_VARIANTS = {("ternary", "ternary"): "tt", ("bool", "ternary"): "ut", ("binary", "binary"): "bb"}


def qbmm_reference(a: Tensor, a_act: str, a_s: Tensor, a_b: Tensor | None, b: Tensor, b_act: str,
                   b_s: Tensor, b_b: Tensor | None, b_kn: bool, scale: Tensor | None,
                   bias: Tensor | None, out_dtype: torch.dtype | None, pad_bits: int) -> Tensor:
    bt = b.transpose(-1, -2) if b_kn else b
    k = a.shape[-1]
    ap = quantize_pack(a, a_act, a_s, a_b, pad_bits)
    bp = quantize_pack(bt, b_act, b_s, b_b, pad_bits)
    variant = QBMM_VARIANTS[(a_act, b_act)]
    if variant == "tt":
        acc = acc_tt(ap, bp)
    elif variant == "ut":
        acc = acc_ut(ap, bp)
    else:
        acc = acc_bb(ap, bp, k)
    return epilogue(acc, scale, bias, out_dtype)


@torch.library.custom_op(f"{LIB}::qbmm", mutates_args=())
def qbmm(a: Tensor, a_act: str, a_s: Tensor, a_b: Tensor | None, b: Tensor, b_act: str, b_s: Tensor,
         b_b: Tensor | None, b_kn: bool, scale: Tensor | None = None, bias: Tensor | None = None,
         out_dtype: torch.dtype | None = None, pad_bits: int = formats.DEFAULT_PAD_BITS,
         kernel_id: str = "") -> Tensor:
    """Fused batched MatMul of two quantized activations (attention): ``a`` [..., M, K] times ``b``
    ([..., K, N] if ``b_kn`` else [..., N, K]); TT for Q·Kᵀ, UT for P·V, BB for binary x binary."""
    check_float("a", a, "qbmm")
    check_float("b", b, "qbmm")
    _check_act("qbmm", a_act, a_s, a_b)
    _check_act("qbmm", b_act, b_s, b_b)
    if (a_act, b_act) not in QBMM_VARIANTS:
        raise ValueError(f"bwta::qbmm: no low-bit variant for {a_act} x {b_act}; supported: {sorted(QBMM_VARIANTS)}")
    kb = b.shape[-2] if b_kn else b.shape[-1]
    if a.shape[-1] != kb:
        raise ValueError(f"bwta::qbmm: contraction sizes differ: a {tuple(a.shape)} vs b {tuple(b.shape)} (b_kn={b_kn})")
    if kernel_id:
        return kernel_registry.get(kernel_id)(a, a_s, a_b, b, b_s, b_b, scale, bias, out_dtype)
    # No generated kernel bound (e.g. a dynamic contraction length): exact GEMM on codes.
    bk = act_codes(b, b_act, b_s, b_b)
    acc = _exact_matmul(act_codes(a, a_act, a_s, a_b), bk if b_kn else bk.transpose(-1, -2))
    return epilogue(acc, scale, bias, out_dtype)


@qbmm.register_fake
def qbmm_fake(a, a_act, a_s, a_b, b, b_act, b_s, b_b, b_kn, scale=None, bias=None, out_dtype=None, pad_bits=64, kernel_id=""):
    n = b.shape[-1] if b_kn else b.shape[-2]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], n), dtype=out_dtype or torch.float32)
