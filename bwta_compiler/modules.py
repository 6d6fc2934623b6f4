"""BWTA modules: quantizers with learnable scales, ``BWTALinear`` and the BWTA attention core.

Every module computes its MatMul on integer codes in fp32 (exact) and applies the scales after
it, so the eager model is the oracle the compiled kernels must match bit for bit, and autograd
through the code ops gives the straight-through / LSQ gradients used for training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import formats, ops


@torch.compiler.disable
def _raise(kind: type[Exception], message: str) -> None:
    """Raise a bad-input error from a module's forward outside Dynamo's tracing: a ``raise`` that
    Dynamo traces makes it skip that forward's code object for good, so after one bad call every
    instance of the module in the process would run uncompiled (and outside the low-bit kernels)."""
    raise kind(message)


class _ScaleQuantizer(nn.Module):
    """Shared state of the activation quantizers: a learnable per-tensor step size ``scale``,
    LSQ-initialised from the first batch it sees (or from :meth:`init_from`)."""

    kind = "ternary"

    def __init__(self, levels: int = 1) -> None:
        super().__init__()
        ops.check_levels(levels, type(self).__name__)
        self.levels = levels
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._init_done = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._init_done = bool(self.initialized)

    def init_from(self, x: Tensor) -> None:
        """LSQ initialisation ``2 * mean|x| / sqrt(Qp)`` from a calibration tensor's finite values
        (a fully masked attention row has NaN probabilities: one such row made every scale NaN
        and the first forward failed inside a code op)."""
        with torch.no_grad():
            x = x.detach()
            finite = torch.isfinite(x)
            if not bool(finite.all()):
                x = x[finite]
                if x.numel() == 0:
                    raise ValueError(f"bwta: {type(self).__name__} calibration input {tuple(finite.shape)} has no "
                                     "finite value (all NaN/inf): cannot initialise its scale")
            self.scale.copy_(self._init_value(x))
            self.initialized.fill_(True)
        self._init_done = True

    def _init_value(self, x: Tensor) -> Tensor:
        return ops.lsq_init(x, self.levels)

    def _maybe_init(self, x: Tensor) -> None:
        # Data-dependent initialisation only runs eagerly; a compiled model uses the stored scale.
        if not self._init_done and not torch.compiler.is_compiling():
            self.init_from(x)

    def step_size(self, x: Tensor) -> Tensor:
        """The scale with the LSQ gradient factor ``1/sqrt(numel * Qp)`` applied to its gradient."""
        self._maybe_init(x)
        if not torch.is_grad_enabled():
            # Inference: no gradient to scale, and numel() would specialise the token dimension.
            return self.scale
        return ops.grad_scale(self.scale, ops.lsq_grad_scale(x.numel(), self.levels))

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


class TernaryQuantizer(_ScaleQuantizer):
    """Signed activations -> {-m..m} codes (m = levels; m = 1 is ternary)."""

    kind = "ternary"

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.step_size(x)
        return ops.ternary_code(x, s, self.levels), s

    def forward(self, x: Tensor) -> Tensor:
        c, s = self.codes(x)
        return c * s.to(x.dtype)


class BoolQuantizer(_ScaleQuantizer):
    """Non-negative activations (probabilities, ReLU outputs) -> {0..m} codes with offset ``b``."""

    kind = "bool"

    def __init__(self, levels: int = 1) -> None:
        super().__init__(levels)
        self.offset = nn.Parameter(torch.tensor(0.0))

    def _init_value(self, x: Tensor) -> Tensor:
        # Asymmetric LSQ/BiT default for {0..m}: 4 * mean|x| / sqrt(Qp).
        return (4 * x.detach().float().abs().mean() / math.sqrt(self.levels)).clamp_min(1e-8)

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.step_size(x)
        return ops.bool_code(x, s, self.offset, self.levels), s

    def forward(self, x: Tensor) -> Tensor:
        c, s = self.codes(x)
        return c * s.to(x.dtype)


class BinaryActQuantizer(_ScaleQuantizer):
    """Plain binarized activations ``s * sign(x)`` (the zero-point-distortion baseline the paper
    compares against): codes {-1,+1}, 0 -> +1."""

    kind = "binary"

    def __init__(self, levels: int = 1) -> None:
        super().__init__(1)

    def _init_value(self, x: Tensor) -> Tensor:
        return x.detach().float().abs().mean().clamp_min(1e-8)

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.step_size(x)
        return ops.sign_code(x, s), s

    def forward(self, x: Tensor) -> Tensor:
        c, s = self.codes(x)
        return c * s.to(x.dtype)


ACT_QUANTIZERS = {"ternary": TernaryQuantizer, "bool": BoolQuantizer, "binary": BinaryActQuantizer}


def make_act_quantizer(kind: str, levels: int = 1) -> _ScaleQuantizer:
    if kind not in ACT_QUANTIZERS:
        raise ValueError(f"unknown activation quantizer {kind!r}; expected one of {sorted(ACT_QUANTIZERS)}")
    return ACT_QUANTIZERS[kind](levels)


class BWTALinear(nn.Module):
    """A linear layer with binary weights (per-output-channel scale) and quantized activations.

    ``y = float(codes(x) @ sign(W - mean)^T) * (alpha * s) + bias``, computed in fp32 and cast
    back to the input dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "ternary",
                 levels: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.act = make_act_quantizer(act, levels)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, lin: nn.Linear, act: str = "ternary", levels: int = 1,
                    share_parameters: bool = False) -> BWTALinear:
        """A BWTA copy of ``lin``; with ``share_parameters`` it holds ``lin``'s own weight and bias
        Parameters instead of copies, so weights tied to other modules (an LM head tied to the
        embeddings, two layers sharing one weight) stay tied."""
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, act, levels,
                device=lin.weight.device, dtype=lin.weight.dtype)
        if share_parameters:
            m.weight, m.bias = lin.weight, lin.bias
            return m
        with torch.no_grad():
            m.weight.copy_(lin.weight)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
        return m

    @property
    def frozen(self) -> bool:
        return self.weight is None

    def freeze_(self, pad_bits: int = 64) -> BWTALinear:
        """Replace the float weight by its packed binary codes and per-channel scale (deployment)."""
        if self.frozen:
            return self
        w = self.weight.detach()
        if w.is_meta:
            # A skeleton that a frozen checkpoint will be loaded into (load_state_dict(assign=True)):
            # only shapes and dtypes exist, and running the packing on meta tensors took 0.58 s
            # for a BERT-base-sized encoder, a tenth of a deployment's start.
            packed = torch.empty(w.shape[0], formats.num_words(w.shape[1], pad_bits), dtype=torch.int32,
                                 device="meta")
            alpha = torch.empty(w.shape[0], dtype=torch.float32, device="meta")
        else:
            with torch.no_grad():
                code, alpha = ops.binary_code_eager(w)
                packed = formats.pack_binary_codes(code, pad_bits)
        del self.weight
        self.weight = None
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_alpha", alpha)
        return self

    def weight_codes(self) -> tuple[Tensor, Tensor]:
        """(binary codes [N, K], alpha [N]) from the float weight, or from the packed one if frozen."""
        if self.frozen:
            return ops.unpack_binary(self.weight_packed, self.in_features, torch.float32), self.weight_alpha
        return ops.binary_code(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            _raise(ValueError, f"BWTALinear: input has K={x.shape[-1]} (shape {tuple(x.shape)}), "
                               f"weight expects K={self.in_features} (out_features {self.out_features})")
        cx, s = self.act.codes(x)
        cw, alpha = self.weight_codes()
        acc = F.linear(cx.float(), cw.float())
        y = acc * (alpha * s.float())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _causal_keep(t: int, s: int, device: torch.device) -> Tensor:
    # Query i (of the last t positions) sees keys j <= i + (s - t): also right for a KV cache.
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def apply_attention_mask(scores: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """Add a float mask or apply a bool keep-mask (True = attend), then the causal mask."""
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    if is_causal:
        keep = _causal_keep(scores.shape[-2], scores.shape[-1], scores.device)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, S, D] -> [B, Hkv*n_rep, S, D] (grouped-query attention)."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=-3)


class AttentionCore(nn.Module):
    """Float scaled-dot-product attention on ``[B, H, T, D]`` tensors (the example models use it;
    :func:`bwta_compiler.quantize` swaps it for :class:`BWTAAttention`)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False, scale: float | None = None) -> Tensor:
        rep = q.shape[-3] // k.shape[-3]
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        if is_causal and attn_mask is None and q.shape[-2] != k.shape[-2]:
            attn_mask, is_causal = _causal_keep(q.shape[-2], k.shape[-2], q.device), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


class BWTAAttention(nn.Module):
    """BWTA attention core: ternary Q, K, V; softmax in fp32; bool probabilities.

    ``scores = float(codes(q) @ codes(k)^T) * (s_q * s_k * scale) (+ mask)``,
    ``P = softmax(scores)``, ``out = float(bool(P) @ codes(v)) * (s_p * s_v)``.
    Grouped-query attention (fewer K/V heads) and KV-cache decoding (query shorter than keys)
    are handled; masks are additive floats or bool keep-masks.
    """

    def __init__(self, levels: int = 1) -> None:
        super().__init__()
        self.q_quant = TernaryQuantizer(levels)
        self.k_quant = TernaryQuantizer(levels)
        self.v_quant = TernaryQuantizer(levels)
        self.p_quant = BoolQuantizer(levels)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False, scale: float | None = None) -> Tensor:
        return self.attend(q, k, v, attn_mask, is_causal, scale)[0]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
               scale: float | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(out, weights)``: ``weights`` [B, H, T, S] are the quantized probabilities P.V used
        (bool codes x their scale), in q's dtype, when ``need_weights``; else None."""
        if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or q.shape[-3] % k.shape[-3]:
            _raise(ValueError, f"BWTAAttention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                               f"v {tuple(v.shape)} (need equal head dims, equal key lengths, heads divisible)")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        cq, sq = self.q_quant.codes(q)
        ck, sk = self.k_quant.codes(k)
        cv, sv = self.v_quant.codes(v)
        rep = q.shape[-3] // k.shape[-3]
        ck, cv = repeat_kv(ck, rep), repeat_kv(cv, rep)
        acc = torch.matmul(cq.float(), ck.float().transpose(-1, -2))
        scores = acc * (sq.float() * sk.float() * scale)
        scores = apply_attention_mask(scores, attn_mask, is_causal)
        probs = torch.softmax(scores, dim=-1)
        cp, sp = self.p_quant.codes(probs)
        out = torch.matmul(cp, cv.float()) * (sp.float() * sv.float())
        weights = (cp * sp.float()).to(q.dtype) if need_weights else None
        return out.to(q.dtype), weights


class BWTAMultiheadAttention(nn.Module):
    """Drop-in replacement of ``nn.MultiheadAttention`` (same constructor semantics, same call
    signature) with BWTA Q/K/V/out projections and a :class:`BWTAAttention` core."""

    def __init__(self, mha: nn.MultiheadAttention, act: str = "ternary") -> None:
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.embed_dim, self.num_heads, self.batch_first = e, h, mha.batch_first
        self.kdim, self.vdim = mha.kdim, mha.vdim
        bias = mha.in_proj_bias is not None
        projs = []
        for i, (name, dim) in enumerate((("q", e), ("k", mha.kdim), ("v", mha.vdim))):
            lin = nn.Linear(dim, e, bias=bias, device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
            with torch.no_grad():
                w = mha.in_proj_weight[i * e:(i + 1) * e] if mha._qkv_same_embed_dim else getattr(mha, f"{name}_proj_weight")
                lin.weight.copy_(w)
                if bias:
                    lin.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
            projs.append(BWTALinear.from_linear(lin, act))
        self.q_proj, self.k_proj, self.v_proj = projs
        self.out_proj = BWTALinear.from_linear(mha.out_proj, act)
        self.core = BWTAAttention()
        # nn.TransformerEncoderLayer / nn.TransformerEncoder read these to decide on their fused
        # float fast path (torch._transformer_encoder_layer_fwd); None turns it off, so the BWTA
        # projections are always the ones that run.
        self.in_proj_weight = self.in_proj_bias = None
        self._qkv_same_embed_dim = False
        # Attention-probability dropout (nn.TransformerEncoderLayer's default 0.1) is a no-op in
        # inference and is not applied to the {0,1} probabilities in training either.
        self.dropout = mha.dropout
        # add_bias_kv: a learned key/value row appended to every sequence (after the projections);
        # add_zero_attn: a zero key/value row appended after that.  Both are attention operands like
        # the projected rows, so they go through the same K/V quantizers.
        self.bias_k = nn.Parameter(mha.bias_k.detach().clone()) if mha.bias_k is not None else None
        self.bias_v = nn.Parameter(mha.bias_v.detach().clone()) if mha.bias_v is not None else None
        self.add_zero_attn = mha.add_zero_attn

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if query.dim() == 2:            # unbatched [L, E] inputs, as nn.MultiheadAttention accepts
            bdim = 0 if self.batch_first else 1
            kpm = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
            out, weights = self.forward(query.unsqueeze(bdim), key.unsqueeze(bdim), value.unsqueeze(bdim), kpm,
                                        need_weights, attn_mask, average_attn_weights, is_causal)
            return out.squeeze(bdim), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, t, _ = query.shape
        s = key.shape[1]
        h, d = self.num_heads, self.embed_dim // self.num_heads
        q = self.q_proj(query).view(b, t, h, d).transpose(1, 2)
        k, v = self._extra_keys(self.k_proj(key), self.v_proj(value))
        extra = k.shape[1] - s
        if extra:       # the appended keys are attended: masks get False / 0 columns for them
            attn_mask, key_padding_mask = _pad_keys(attn_mask, extra), _pad_keys(key_padding_mask, extra)
            s += extra
        k = k.view(b, s, h, d).transpose(1, 2)
        v = v.view(b, s, h, d).transpose(1, 2)
        mask = _merge_mha_masks(attn_mask, key_padding_mask, b, h, t, s, query.dtype)
        if need_weights and isinstance(self.core, BWTAAttention):
            ctx, weights = self.core.attend(q, k, v, mask, is_causal and mask is None, need_weights=True)
        else:   # a float core swapped in (routing checks) returns no weights, as before
            ctx, weights = self.core(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None), None
        out = self.out_proj(ctx.transpose(1, 2).reshape(b, t, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)       # [B, T, S], as nn.MultiheadAttention
        return out, weights

    def _extra_keys(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Projected [B, S, E] keys/values with the add_bias_kv row and the add_zero_attn row appended."""
        b = k.shape[0]
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.to(k.dtype).expand(b, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.to(v.dtype).expand(b, 1, -1)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(b, 1, k.shape[-1])], dim=1)
            v = torch.cat([v, v.new_zeros(b, 1, v.shape[-1])], dim=1)
        return k, v


def _pad_keys(mask: Tensor | None, n: int) -> Tensor | None:
    """``mask`` with ``n`` more key columns that mask nothing (False / 0.0), as nn.MultiheadAttention
    pads its masks for add_bias_kv and add_zero_attn."""
    return None if mask is None else F.pad(mask, (0, n))


def _merge_mha_masks(attn_mask: Tensor | None, key_padding_mask: Tensor | None, b: int, h: int, t: int,
                     s: int, dtype: torch.dtype) -> Tensor | None:
    # nn.MultiheadAttention masks mean True = *ignore*; convert to an additive float mask.
    def to_additive(m: Tensor) -> Tensor:
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.float()

    mask = None
    if attn_mask is not None:
        am = to_additive(attn_mask)
        mask = am.view(b, h, t, s) if am.dim() == 3 else am.view(1, 1, t, s)
    if key_padding_mask is not None:
        kp = to_additive(key_padding_mask).view(b, 1, 1, s)
        mask = kp if mask is None else mask + kp
    return mask
