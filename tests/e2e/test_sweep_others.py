"""Sweep of transformer code written by other people (nn.Transformer, MHA options, ALiBi, Swin-style
window attention, Hugging Face MoE decoders): the cases that were wrong or unreported.

* a hand-written attention whose projections are ``x @ self.w.T`` had those projections quantized
  as Q·Kᵀ with the attention's quantizers (the weight ternarized, Q·Kᵀ's scales calibrated on the
  projection input);
* attention spelled with ``torch.einsum`` (Swin, many vision models) was neither quantized nor listed;
* Bloom-style ``alibi.baddbmm(q, k, beta=1, alpha=1/sqrt(d))`` left Q·Kᵀ float while the quantize
  report counted the attention as BWTA;
* nn.MultiheadAttention with add_bias_kv / add_zero_attn stayed entirely float (now BWTA, with the
  appended key/value rows and padded masks as torch has them);
* Hugging Face Bloom / MPT (ALiBi) and MPNet compute attention themselves and stayed float; one
  plain attention like theirs is now redirected to BWTA (DeBERTa's disentangled one stays float);
* ``output_attentions=True`` on a Hugging Face model routed to BWTA attention returned an empty
  ``attentions`` tuple without a word (now the quantized probabilities P·V used);
* MoE experts (stacked 3-d weights) and routers (``F.linear(x, self.weight)``) stayed float without
  a word in the quantize report, and their grouped MatMuls were missing from the compiled report's
  count.
"""

import math
import warnings
from unittest import mock

import pytest
import torch
from model_zoo import float_routed_mha, pass_through_attention_codes
from torch import nn

import bwta_compiler as bc
from bwta_compiler import ops

EAGER = {"fallback": "eager"}


def _compile_and_compare(q, calls, **kwargs):
    """Calibrate on the first call, compile, and check every call bitwise against the eager model."""
    with torch.no_grad():
        q(*calls[0], **kwargs)
        c = torch.compile(q, backend="bwta", options=EAGER)
        for args in calls:
            ref, out = q(*args, **kwargs), c(*args, **kwargs)
            for field in ("logits", "last_hidden_state"):
                ref, out = (getattr(ref, field), getattr(out, field)) if hasattr(ref, field) else (ref, out)
            assert torch.equal(out, ref), (out - ref).abs().max()
    return bc.last_report()


class ProjByTransposedParam(nn.Module):
    """Hand-written attention with its projections written ``x @ self.w.T`` (no nn.Linear)."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(d, d) / d ** 0.5) for _ in range(3))
        self.o = nn.Linear(d, d)

    def split(self, y):
        b, t, d = y.shape
        return y.view(b, t, self.h, d // self.h).transpose(1, 2)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.split(x @ self.wq.T), self.split(x @ self.wk.T), self.split(x @ self.wv.T)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.h), -1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, d))


def test_projection_by_transposed_parameter_is_not_attention():
    model = ProjByTransposedParam().eval()
    q = bc.quantize(model)
    own = [e for e in q.bwta_report if e.name == "<root>" and e.kind == "linear"]
    assert len(own) == 1 and own[0].choice == "float" and "wq [32, 32]" in own[0].reason, q.bwta_report
    x = torch.randn(2, 7, 32)
    rep = _compile_and_compare(q, [(x,), (torch.randn(2, 10, 32),)])
    # Per graph: Q·Kᵀ, P·V and the o projection in low bit; the three x @ w.T projections float.
    assert rep.lowbit == 6 and rep.total == 12, str(rep)
    # Q·Kᵀ's quantizer was calibrated on Q (the projection's output), not on the projection input x.
    with torch.no_grad():
        expected = ops.lsq_init(model.split(x @ model.wq.T), 1)
    torch.testing.assert_close(q.bwta_core.q_quant.scale.detach(), expected)


class WindowAttention(nn.Module):
    """Swin-style window attention: relative position bias table, shift mask, einsum or matmul."""

    def __init__(self, d=32, h=4, win=4, einsum=True):
        super().__init__()
        self.h, self.einsum = h, einsum
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.relative_position_bias_table = nn.Parameter(torch.randn(2 * win - 1, h) * 0.5)
        self.register_buffer("rel_index", torch.arange(win)[:, None] - torch.arange(win)[None, :] + win - 1)
        self.attn_drop = nn.Dropout(0.1)

    def forward(self, x, mask):
        bw, n, d = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        q = q * (d // self.h) ** -0.5
        attn = torch.einsum("bhqd,bhkd->bhqk", q, k) if self.einsum else q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.rel_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        nw = mask.shape[0]
        attn = (attn + bias).view(bw // nw, nw, self.h, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = self.attn_drop(attn.view(-1, self.h, n, n).softmax(dim=-1))
        out = torch.einsum("bhqk,bhkd->bhqd", attn, v) if self.einsum else attn @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, d))


def test_einsum_window_attention_is_quantized():
    torch.manual_seed(0)
    model = WindowAttention().eval()
    mask = torch.zeros(2, 4, 4)
    mask[1, :2, 2:] = mask[1, 2:, :2] = -100.0
    q = bc.quantize(model)
    assert [e.choice for e in q.bwta_report if e.kind == "attention"] == ["bwta"], q.bwta_report
    calls = [(torch.randn(4, 4, 32), mask), (torch.randn(6, 4, 32), mask)]
    rep = _compile_and_compare(q, calls)
    assert rep.lowbit == rep.total == 8, str(rep)        # qkv, proj, Q·Kᵀ, P·V; two batch sizes
    # The einsum spelling quantizes exactly like the matmul spelling of the same attention.
    _same_as_spelled(q, model, WindowAttention(einsum=False), calls)


def _same_as_spelled(quantized: nn.Module, model: nn.Module, spelled: nn.Module, calls: list) -> None:
    """``quantized`` (``model`` quantized) equals the quantized ``spelled`` model, the same attention
    written with other ops, given ``model``'s weights (the first call calibrates its scales)."""
    spelled.eval().load_state_dict(model.state_dict())
    qm = bc.quantize(spelled)
    with torch.no_grad():
        qm(*calls[0])
        for args in calls:
            torch.testing.assert_close(quantized(*args), qm(*args), rtol=1e-5, atol=1e-5)


class AlibiBaddbmm(nn.Module):
    """Hand-written causal ALiBi attention (Bloom): ``beta * alibi + alpha * Q·Kᵀ`` in one baddbmm."""

    def __init__(self, d=32, h=4, baddbmm=True):
        super().__init__()
        self.h, self.baddbmm = h, baddbmm
        self.query_key_value, self.dense = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("slopes", torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)]))

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.h
        q, k, v = (y.transpose(1, 2).reshape(b * self.h, t, hd)
                   for y in self.query_key_value(x).view(b, t, self.h, 3, hd).unbind(3))
        alibi = (self.slopes[:, None] * torch.arange(t)[None, :]).repeat(b, 1).view(b * self.h, 1, t)
        if self.baddbmm:
            scores = alibi.baddbmm(batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(hd))
        else:
            scores = torch.bmm(q, k.transpose(1, 2)) * (1 / math.sqrt(hd)) + alibi
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), torch.finfo(scores.dtype).min)
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.dense(torch.bmm(p, v).view(b, self.h, t, hd).transpose(1, 2).reshape(b, t, d))


def test_baddbmm_alibi_attention_is_quantized():
    torch.manual_seed(0)
    model = AlibiBaddbmm().eval()
    q = bc.quantize(model)
    calls = [(torch.randn(2, 7, 32),), (torch.randn(2, 10, 32),)]
    rep = _compile_and_compare(q, calls)
    assert rep.lowbit == rep.total == 8, str(rep)        # qkv, dense, Q·Kᵀ, P·V; two lengths
    _same_as_spelled(q, model, AlibiBaddbmm(baddbmm=False), calls)


class _MHA(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, **kw)

    def forward(self, q, kv, key_padding_mask=None, attn_mask=None):
        return self.mha(q, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask)[0]


@pytest.mark.parametrize("kw", [{"add_bias_kv": True, "batch_first": True},
                                {"add_bias_kv": True, "add_zero_attn": True, "kdim": 24, "vdim": 24}])
def test_multihead_attention_bias_kv_and_zero_attn(kw):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, **kw).eval()
    bf, kd = kw.get("batch_first", False), kw.get("kdim", 32)
    q = torch.randn(2, 5, 32) if bf else torch.randn(5, 2, 32)
    kv = torch.randn(2, 7, kd) if bf else torch.randn(7, 2, kd)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 5:] = True
    am = torch.zeros(5, 7, dtype=torch.bool)
    am[:, -1] = True
    routed = float_routed_mha(mha)
    with torch.no_grad():
        for masks in ({}, {"key_padding_mask": kpm, "attn_mask": am}, {"attn_mask": torch.randn(8, 5, 7)}):
            torch.testing.assert_close(routed(q, kv, kv, **masks)[0], mha(q, kv, kv, **masks)[0],
                                       rtol=1e-4, atol=1e-5)
    model = _MHA(**kw).eval()
    qm = bc.quantize(model)
    assert [e.choice for e in qm.bwta_report] == ["bwta"], qm.bwta_report
    kv2 = torch.randn(2, 9, kd) if bf else torch.randn(9, 2, kd)
    rep = _compile_and_compare(qm, [(q, kv, kpm, am), (q, kv2)])
    assert rep.lowbit == rep.total == 12, str(rep)          # 4 projections + Q·Kᵀ + P·V, two graphs


def _mixtral():
    tf = pytest.importorskip("transformers")
    cfg = tf.MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return tf.MixtralForCausalLM(cfg).eval()


def test_moe_router_and_experts_are_reported_float():
    q = bc.quantize(_mixtral())
    float_entries = {e.name: e.reason for e in q.bwta_report if e.choice == "float"}
    assert "gate_up_proj [4, 128, 32]" in float_entries.get("model.layers.0.mlp.experts", ""), float_entries
    assert "weight [4, 32]" in float_entries.get("model.layers.0.mlp.gate", ""), float_entries
    rep = _compile_and_compare(q, [(torch.randint(0, 90, (2, 7)),), (torch.randint(0, 90, (2, 9)),)])
    floats = [m for g in rep.graphs for m in g.matmuls if not m.lowbit]
    grouped = [m for m in floats if "grouped" in m.op or "grouped" in m.reason]
    # Per graph: q, k, v, o, Q·Kᵀ, P·V low bit; router, lm_head and the experts' MatMuls float.
    assert rep.lowbit == 12 and len(grouped) >= 4 and rep.total == 12 + 4 + len(grouped), str(rep)
    assert all(m.reason for m in floats)


def test_failed_graph_counts_grouped_matmuls():
    from bwta_compiler import passes

    def broken(gm, ctx):
        raise RuntimeError("injected failure")

    broken.__name__ = "fuse_epilogue"
    pipeline = tuple(broken if p.__name__ == "fuse_epilogue" else p for p in passes.PIPELINE)
    q = bc.quantize(_mixtral())
    with mock.patch.object(passes, "PIPELINE", pipeline), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = _compile_and_compare(q, [(torch.randint(0, 90, (2, 7)),)])
    assert any("runs without bwta" in str(w.message) for w in caught)
    ops_seen = sorted(m.op for m in rep.graphs[0].matmuls)
    assert rep.lowbit == 0 and any("grouped" in o for o in ops_seen) and len(ops_seen) >= 10, ops_seen


def test_hf_output_attentions_are_the_quantized_probabilities():
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    q = bc.quantize(tf.LlamaForCausalLM(cfg).eval())
    x = torch.randint(0, 90, (2, 7))
    with torch.no_grad():
        q(x)
        out = q(x, output_attentions=True)
        compiled = torch.compile(q, backend="bwta", options=EAGER)(x, output_attentions=True)
    (att,) = out.attentions
    core = q.model.layers[0].self_attn.bwta_core
    assert att.shape == (2, 4, 7, 7) and set(att.unique().tolist()) <= {0.0, core.p_quant.scale.item()}
    assert torch.equal(compiled.attentions[0], att) and torch.equal(compiled.logits, out.logits)


@pytest.mark.parametrize("name", ["bloom", "mpnet"])
def test_hf_self_computed_attention_is_redirected(name):
    tf = pytest.importorskip("transformers")
    from bwta_compiler.quantize import QuantConfig

    torch.manual_seed(0)
    if name == "bloom":
        model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=100, hidden_size=32, n_layer=1, n_head=4)).eval()
        keep_float, mask = r"(query_key_value|dense|lm_head|embed)", torch.ones(2, 7, dtype=torch.long)
        mask[0, :2] = 0                       # left padding
    else:
        model = tf.MPNetModel(tf.MPNetConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4)).eval()
        keep_float, mask = r"(\.q$|\.k$|\.v$|\.o$|dense|embed)", torch.ones(2, 7, dtype=torch.long)
        mask[0, 5:] = 0                       # right padding
    x = torch.randint(3, 90, (2, 7))
    routed = bc.quantize(model, QuantConfig(rules=[(keep_float, "float")]))
    assert pass_through_attention_codes(routed) == 1
    with torch.no_grad():
        ref, out = model(x, attention_mask=mask), routed(x, attention_mask=mask)
    ref, out = (ref.logits, out.logits) if name == "bloom" else (ref.last_hidden_state, out.last_hidden_state)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)
    q = bc.quantize(model)
    assert [e.choice for e in q.bwta_report if e.kind == "attention"] == ["bwta"], q.bwta_report
    rep = _compile_and_compare(q, [(x,)], attention_mask=mask)
    # Bloom: qkv, dense, 2 MLP, Q·Kᵀ, P·V (lm_head float); MPNet: q, k, v, o, 2 FFN, Q·Kᵀ, P·V (pooler float)
    assert rep.lowbit == rep.total - 1 == (6 if name == "bloom" else 8), str(rep)
