"""A LLaMA-style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention, causal mask,
and a simple KV cache for decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import AttentionCore


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 32000
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    intermediate: int = 11008
    max_positions: int = 2048
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @staticmethod
    def llama_7b(**kw) -> DecoderConfig:
        return DecoderConfig(**kw)

    @staticmethod
    def tiny(**kw) -> DecoderConfig:
        base = dict(vocab_size=1000, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160, max_positions=256)
        base.update(kw)
        return DecoderConfig(**base)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Rotate-half rotary embedding of x [B, H, T, D] at positions pos [T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rot = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


class DecoderAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.hidden // cfg.heads
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.hidden, bias=False)
        self.core = AttentionCore()

    def forward(self, x: Tensor, pos: Tensor, cache: tuple[Tensor, Tensor] | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.cfg.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.cfg.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.cfg.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotary(q, pos, self.cfg.rope_theta), rotary(k, pos, self.cfg.rope_theta)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        ctx = self.core(q, k, v, is_causal=True)
        return self.o_proj(ctx.transpose(1, 2).reshape(b, t, -1)), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.attention = DecoderAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: Tensor, pos: Tensor, cache):
        a, cache = self.attention(self.attn_norm(x), pos, cache)
        x = x + a
        h = self.ffn_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), cache


class Decoder(nn.Module):
    """``forward(input_ids [B,T], cache=None) -> (logits [B,T,V], new_cache)``.

    ``cache`` is a list of per-layer (k, v) tensors [B, Hkv, S, D]; pass the returned cache back
    with the next token(s) to decode.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, cache: list | None = None):
        past = 0 if cache is None else cache[0][0].shape[2]
        pos = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, pos, None if cache is None else cache[i])
            new_cache.append(c)
        return self.lm_head(self.norm(x)), new_cache
