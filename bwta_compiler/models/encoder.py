"""A BERT-style encoder: post-LayerNorm blocks, GELU FFN, padding mask, optional classifier head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import AttentionCore


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 30522
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12
    num_labels: int = 0   # > 0 adds a classifier head on the [CLS] token

    @staticmethod
    def bert_base(**kw) -> EncoderConfig:
        return EncoderConfig(**kw)

    @staticmethod
    def tiny(**kw) -> EncoderConfig:
        base = dict(vocab_size=1000, hidden=64, layers=2, heads=4, intermediate=256, max_positions=256)
        base.update(kw)
        return EncoderConfig(**base)


class EncoderSelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.core = AttentionCore()
        self.output = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, t, h = x.shape
        split = lambda y: y.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        ctx = self.core(split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=mask)
        return self.output(ctx.transpose(1, 2).reshape(b, t, h))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attention = EncoderSelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.hidden, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.ln1(x + self.attention(x, mask))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class Encoder(nn.Module):
    """``forward(input_ids [B,T], attention_mask [B,T] of 1/0 or None) -> hidden [B,T,H]``
    (or logits [B, num_labels] when the config has a classifier head)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.embed_positions = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.embed_types = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.embed_ln = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.classifier = nn.Linear(cfg.hidden, cfg.num_labels) if cfg.num_labels else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(pos) + self.embed_types.weight[0]
        x = self.embed_ln(x)
        mask = None
        if attention_mask is not None:
            # Additive mask [B, 1, 1, T]: 0 where attended, a large negative where padded.
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask)
        if self.classifier is not None:
            return self.classifier(x[:, 0])
        return x
