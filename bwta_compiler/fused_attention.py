"""Fused BWTA attention on integer scores: the exact definition the CUDA fused kernel reproduces.

BWTA attention (``modules.BWTAAttention``) computes ``s = codes(q) . codes(k)`` (integers, |s| <= D),
``P = softmax(s * c + mask)`` with ``c = s_q * s_k * scale``, bool codes ``P > b + s_p/2`` and
``out = float(bool(P) . codes(v)) * (s_p * s_v)``.  Because s is a small integer, one row's softmax
needs no float scores at all:

* the denominator is ``sum_v hist[v] * E[v - max]`` over the 2D+1 possible values, with the table
  ``E[j] = exp(c * j)`` (fp32, j = -2D..0) and the fp32 sum taken in ascending score order;
* ``E[s - max] / den > thr`` is monotone in s, so the bool quantizer becomes one integer threshold
  per row, and the bits feed P.V directly.

This differs from ``torch.softmax`` only by fp32 rounding (exp and summation order), so codes can
differ from the eager module only where a probability sits within an ulp or so of the threshold;
the kernel equals :func:`fused_attention_reference` bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .modules import _causal_keep, repeat_kv
from .ops import bool_thresholds, ternary_code_eager


@dataclass(frozen=True)
class FusedAttentionParams:
    """Compile-time shape of one fused attention kernel (T, S, batch and heads are run time)."""

    head_dim: int                 # D of q and k
    v_dim: int                    # D of v (output head dim)
    causal: bool = False
    has_mask: bool = False        # a per-batch key keep-mask [B, S] (padding)
    in_dtype: str = "float16"
    out_dtype: str = "float16"
    isa: str = "sm_90"
    warps: int = 0                # 0: chosen from the histogram's shared-memory size

    def replace(self, **kw) -> FusedAttentionParams:
        import dataclasses
        return dataclasses.replace(self, **kw)


def exp_table(c: Tensor, head_dim: int) -> Tensor:
    """``E[j + 2D] = exp(c * j)`` for j = -2D..0, in fp32 (c a one-element fp32 tensor)."""
    j = torch.arange(-2 * head_dim, 1, device=c.device, dtype=torch.float32)
    return torch.exp(c.reshape(()).float() * j)


def score_scale(sq: Tensor, sk: Tensor, scale: float) -> Tensor:
    # As BWTAAttention: sq.float() * sk.float() * scale, in fp32.
    return sq.detach().float().reshape(()) * sk.detach().float().reshape(()) * scale


def visibility(b: int, h: int, t: int, s: int, is_causal: bool, key_keep: Tensor | None,
               device: torch.device) -> Tensor:
    vis = torch.ones(b, h, t, s, dtype=torch.bool, device=device)
    if is_causal:
        vis = vis & _causal_keep(t, s, device)
    if key_keep is not None:
        vis = vis & key_keep.to(torch.bool).reshape(b, 1, 1, s)
    return vis


def integer_softmax_bits(acc: Tensor, vis: Tensor, etab: Tensor, thr: Tensor, head_dim: int) -> Tensor:
    """Bool codes of softmax over integer scores ``acc`` [..., T, S] (see the module docstring)."""
    d = head_dim
    hb = 2 * d + 1
    idx = (acc + d).clamp(0, 2 * d).to(torch.int64)
    hist = torch.zeros(*acc.shape[:-1], hb, dtype=torch.int64, device=acc.device)
    hist.scatter_add_(-1, torch.where(vis, idx, 0), vis.to(torch.int64))
    nz = hist > 0
    has = nz.any(-1)
    ar = torch.arange(hb, device=acc.device)
    vmax = torch.where(nz, ar, -1).amax(-1)                                  # [..., T]
    den = torch.zeros(acc.shape[:-1], dtype=torch.float32, device=acc.device)
    thr_v = torch.full(acc.shape[:-1], 1 << 30, dtype=torch.int64, device=acc.device)
    for v in range(hb):
        live = v <= vmax
        e = etab[(v - vmax + 2 * d).clamp(0, 2 * d)]
        den = torch.where(live, den + hist[..., v].to(torch.float32) * e, den)
    for v in range(hb):
        live = v <= vmax
        e = etab[(v - vmax + 2 * d).clamp(0, 2 * d)]
        hit = live & (e / den > thr) & (thr_v == (1 << 30))
        thr_v = torch.where(hit, v, thr_v)
    zero_bit = (torch.zeros((), dtype=torch.float32, device=acc.device) > thr) & has
    bits = torch.where(vis, idx >= thr_v.unsqueeze(-1), zero_bit.unsqueeze(-1).expand_as(vis))
    return bits


def fused_attention_reference(q: Tensor, k: Tensor, v: Tensor, sq: Tensor, sk: Tensor, sv: Tensor, sp: Tensor,
                              bp: Tensor, scale: float | None = None, is_causal: bool = False,
                              key_keep: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """q [B, H, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (float); scales are one-element tensors;
    ``key_keep`` [B, S] bool (True = attend).  Returns [B, H, T, Dv] in ``out_dtype`` (default q's)."""
    bsz, h, t, d = q.shape
    s = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cq = ternary_code_eager(q, sq)
    ck = repeat_kv(ternary_code_eager(k, sk), h // k.shape[-3])
    cv = repeat_kv(ternary_code_eager(v, sv), h // v.shape[-3])
    acc = torch.matmul(cq.double(), ck.double().transpose(-1, -2)).round().to(torch.int64)
    vis = visibility(bsz, h, t, s, is_causal, key_keep, q.device)
    etab = exp_table(score_scale(sq, sk, scale), d)
    thr = bool_thresholds(sp, bp, 1, torch.float32)[0]
    bits = integer_softmax_bits(acc, vis, etab, thr, d)
    out = torch.matmul(bits.double(), cv.double()).round().to(torch.float32)
    out = out * (sp.detach().float().reshape(()) * sv.detach().float().reshape(()))
    return out.to(out_dtype or q.dtype)
