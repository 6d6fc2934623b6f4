"""Small user-written transformer pieces shared by the tests (the way people write attention)."""

import torch
import torch.nn.functional as F
from torch import nn


class SDPABlock(nn.Module):
    """A plain user module that calls F.scaled_dot_product_attention itself."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)       # fused QKV
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MatmulSoftmaxBlock(nn.Module):
    """Hand-written attention: matmul, scale, mask, softmax, matmul."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.h, d // self.h).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / (d // self.h) ** 0.5 + mask
        p = torch.softmax(scores, dim=-1)
        return self.o(torch.matmul(p, v).transpose(1, 2).reshape(b, t, d))


class RawOpsModel(nn.Module):
    """Written directly with bwta code ops, ``x @ w.t()`` and ``torch.bmm``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 32))
        self.s = nn.Parameter(torch.tensor(0.6))
        self.sk = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        bw = torch.ops.bwta
        cx = bw.ternary_code(x, self.s, 1)
        cw, alpha = bw.binary_code(self.w)
        y = (cx @ cw.t()) * (alpha * self.s)                      # [B, T, 24]
        q = bw.ternary_code(y, self.sk, 1)
        return torch.bmm(q, q.transpose(1, 2)) * (self.sk * self.sk)


def float_routed_mha(mha: nn.MultiheadAttention) -> nn.Module:
    """``BWTAMultiheadAttention(mha)`` with float projections and a float core: it must equal ``mha``
    (checks the routing, masks and head layout without any quantization)."""
    import bwta_compiler as bc
    from bwta_compiler.modules import AttentionCore

    b = bc.BWTAMultiheadAttention(mha)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        lin = getattr(b, name)
        f = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        f.load_state_dict({"weight": lin.weight, **({"bias": lin.bias} if lin.bias is not None else {})})
        setattr(b, name, f)
    b.core = AttentionCore()
    return b


def pass_through_attention_codes(q: nn.Module) -> int:
    """Make the quantizers of every BWTA attention core that quantize() redirected a module's own
    attention to pass values through (codes = x, scale 1): the redirected model must then compute
    the model's own float attention.  Returns how many cores there are."""
    from bwta_compiler import BWTAAttention

    cores = [m.bwta_core for m in q.modules() if isinstance(getattr(m, "bwta_core", None), BWTAAttention)]
    for core in cores:
        for quant in (core.q_quant, core.k_quant, core.v_quant, core.p_quant):
            quant.codes = lambda x: (x, torch.ones((), dtype=x.dtype))
    return len(cores)
