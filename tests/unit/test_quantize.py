"""quantize(): which layers become BWTA, that the input is untouched, and that results follow the
BWTA arithmetic on the example models, plain SDPA/matmul modules, nn.MultiheadAttention and HF models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from model_zoo import MatmulSoftmaxBlock, SDPABlock
from torch import nn

import bwta_compiler as bc
from bwta_compiler.models import Decoder, DecoderConfig, Encoder, EncoderConfig


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def test_encoder_swaps_and_leaves_input_untouched():
    m = Encoder(EncoderConfig.tiny(num_labels=3)).eval()
    before = copy.deepcopy(m.state_dict())
    q = bc.quantize(m)
    assert _count(q, bc.BWTALinear) == 2 * 6          # q, k, v, out, fc1, fc2 per layer
    assert _count(q, bc.BWTAAttention) == 2
    assert isinstance(q.classifier, nn.Linear) and not isinstance(q.classifier, bc.BWTALinear)
    assert _count(m, bc.BWTALinear) == 0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert q(ids, torch.ones(2, 9)).shape == (2, 3)


def test_rules_keep_layers_float():
    m = Encoder(EncoderConfig.tiny())
    cfg = bc.QuantConfig(rules=[(r"layers\.0\.", "float")] + bc.QuantConfig().rules)
    q = bc.quantize(m, cfg)
    assert not isinstance(q.layers[0].fc1, bc.BWTALinear) and isinstance(q.layers[1].fc1, bc.BWTALinear)
    assert any("layers.0.fc1" in line for line in bc.report_lines(q))


def test_decoder_kv_cache_decoding_matches_full_pass():
    torch.manual_seed(0)
    d = bc.quantize(Decoder(DecoderConfig.tiny())).eval()
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        d(ids)                       # initialise quantizer scales from a batch
        full, _ = d(ids)
        _, cache = d(ids[:, :6])
        step, _ = d(ids[:, 6:], cache)
    assert torch.allclose(step[:, 0], full[:, 6], atol=1e-5, rtol=1e-5)


def _reference_attention(core, q, k, v, mask=None, causal=False):
    """Independent formula of the BWTA attention core (codes, scales, fp32 softmax, bool P):
    (output, quantized probabilities)."""
    bw = torch.ops.bwta
    cq = bw.ternary_code(q, core.q_quant.scale.detach(), 1)
    ck = bw.ternary_code(k, core.k_quant.scale.detach(), 1)
    cv = bw.ternary_code(v, core.v_quant.scale.detach(), 1)
    sc = cq @ ck.transpose(-1, -2) * (core.q_quant.scale * core.k_quant.scale / q.shape[-1] ** 0.5)
    if mask is not None:
        sc = sc + mask
    if causal:
        sc = sc.masked_fill(~torch.ones(sc.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    p = bw.bool_code(torch.softmax(sc, -1), core.p_quant.scale.detach(), core.p_quant.offset.detach(), 1)
    return (p @ cv) * (core.p_quant.scale * core.v_quant.scale), p * core.p_quant.scale


def test_sdpa_caller_is_redirected_to_bwta_core():
    blk = SDPABlock().eval()
    q = bc.quantize(blk)
    assert isinstance(q.qkv, bc.BWTALinear) and isinstance(q.bwta_core, bc.BWTAAttention)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        q(x)
        got = q(x)
        b, t, d = x.shape
        qq, kk, vv = q.qkv(x).view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
        ctx, _ = _reference_attention(q.bwta_core, qq, kk, vv, causal=True)
        expect = q.proj(ctx.transpose(1, 2).reshape(b, t, d))
    torch.testing.assert_close(got, expect)


def test_multihead_attention_swapped():
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    q = bc.quantize(nn.Sequential(mha))
    layer = q[0]
    assert isinstance(layer, bc.BWTAMultiheadAttention)
    assert torch.equal(layer.k_proj.weight, mha.in_proj_weight[32:64])
    assert torch.equal(layer.v_proj.bias, mha.in_proj_bias[64:])
    x = torch.randn(2, 6, 32)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        layer(x, x, x, key_padding_mask=pad)
        out, weights = layer(x, x, x, key_padding_mask=pad)
        split = lambda y: y.view(2, 6, 4, 8).transpose(1, 2)
        mask = torch.zeros(2, 1, 1, 6).masked_fill(pad[:, None, None, :], float("-inf"))
        ctx, probs = _reference_attention(layer.core, split(layer.q_proj(x)), split(layer.k_proj(x)),
                                          split(layer.v_proj(x)), mask=mask)
        expect = layer.out_proj(ctx.transpose(1, 2).reshape(2, 6, 32))
        per_head = layer(x, x, x, key_padding_mask=pad, average_attn_weights=False)[1]
        assert layer(x, x, x, key_padding_mask=pad, need_weights=False)[1] is None
    torch.testing.assert_close(out, expect)
    # need_weights (nn.MultiheadAttention's default): the quantized probabilities P.V used,
    # averaged over heads [B, T, S] unless average_attn_weights=False [B, H, T, S].
    assert weights.shape == (2, 6, 6) and per_head.shape == (2, 4, 6, 6)
    torch.testing.assert_close(per_head, probs)
    torch.testing.assert_close(weights, probs.mean(1))
    assert probs.abs().sum() > 0 and weights[1, :, 4:].abs().sum() == 0    # padded keys get no weight


def test_hf_bert_and_llama():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)).eval()
    qb = bc.quantize(bert)
    assert _count(qb, bc.BWTALinear) == 2 * 6 and _count(qb, bc.BWTAAttention) == 2
    assert isinstance(qb.pooler.dense, nn.Linear) and not isinstance(qb.pooler.dense, bc.BWTALinear)
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    with torch.no_grad():
        h = qb(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(h).all()

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64)).eval()
    ql = bc.quantize(llama)
    assert _count(ql, bc.BWTALinear) == 2 * 7 and _count(ql, bc.BWTAAttention) == 2
    assert not isinstance(ql.lm_head, bc.BWTALinear)
    with torch.no_grad():
        ql(input_ids=ids)
        full = ql(input_ids=ids).logits
        out = ql(input_ids=ids[:, :7], use_cache=True)
        step = ql(input_ids=ids[:, 7:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, 0], full[:, 7], atol=1e-4, rtol=1e-4)


def test_quantized_model_trains():
    torch.manual_seed(0)
    cfg = EncoderConfig.tiny(num_labels=2, layers=1, vocab_size=50)
    model = bc.quantize(Encoder(cfg)).train()
    ids = torch.randint(0, 50, (32, 8))
    labels = (ids[:, 1] < 25).long()        # a learnable synthetic rule
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = F.cross_entropy(model(ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    # the quantizer scales themselves received gradients
    assert model.layers[0].fc1.act.scale.grad is not None


def test_linear_input_checks():
    lin = bc.BWTALinear(16, 4)
    with pytest.raises(ValueError, match=r"input has K=8 .*weight expects K=16"):
        lin(torch.randn(2, 8))


def test_matmul_softmax_attention_is_quantized():
    blk = MatmulSoftmaxBlock().eval()
    q = bc.quantize(blk)
    assert isinstance(q.bwta_core, bc.BWTAAttention)
    assert any("matmul/softmax" in e.reason for e in q.bwta_report)
    x = torch.randn(2, 6, 32)
    mask = torch.zeros(2, 1, 1, 6)
    mask[1, ..., 4:] = float("-inf")
    with torch.no_grad():
        q(x, mask)
        got = q(x, mask)
        split = lambda y: y.view(2, 6, 4, 8).transpose(1, 2)
        ctx, _ = _reference_attention(q.bwta_core, split(q.q(x)), split(q.k(x)), split(q.v(x)), mask=mask)
        expect = q.o(ctx.transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(got, expect)


def test_bare_layers_are_swapped():
    """quantize() of a single layer returns its BWTA twin (not the layer unchanged)."""
    lin = nn.Linear(33, 5)
    q = bc.quantize(lin)
    assert isinstance(q, bc.BWTALinear) and torch.equal(q.weight, lin.weight)
    assert [(e.name, e.kind, e.choice) for e in q.bwta_report] == [("", "linear", "bwta")]
    x = torch.randn(3, 33)
    with torch.no_grad():
        q(x)
        cw, alpha = torch.ops.bwta.binary_code(lin.weight)
        expect = torch.ops.bwta.ternary_code(x, q.act.scale, 1) @ cw.t() * (alpha * q.act.scale) + lin.bias
        torch.testing.assert_close(q(x), expect)
    mha = bc.quantize(nn.MultiheadAttention(16, 2, batch_first=True))
    assert isinstance(mha, bc.BWTAMultiheadAttention)
    assert bc.quantize(lin, bc.QuantConfig(rules=[(".*", "float")])).__class__ is nn.Linear


def test_hf_attention_that_stays_float_is_reported():
    """Attention BWTA cannot take over is listed as float with the reason, never counted as BWTA:
    modules that compute attention themselves (DeBERTa-v2, MPNet) and layers passing a logit
    softcap (Gemma 2)."""
    transformers = pytest.importorskip("transformers")
    deberta = transformers.DebertaV2Model(transformers.DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        relative_attention=True, position_buckets=8))
    gemma2 = transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    for model, why in ((deberta, "computes attention itself"), (gemma2, "softcap")):
        entries = [e for e in bc.quantize(model.eval()).bwta_report if e.kind == "attention"]
        assert len(entries) == 1 and entries[0].choice == "float" and why in entries[0].reason, entries


@pytest.mark.parametrize("k, n, pad_bits", [(64, 8, 64), (100, 7, 64), (33, 5, 128)])
def test_freezing_a_meta_skeleton_gives_the_buffers_a_real_freeze_gives(k, n, pad_bits):
    real = bc.freeze(bc.quantize(nn.Sequential(nn.Linear(k, n))), pad_bits)
    with torch.device("meta"):
        meta = bc.freeze(bc.quantize(nn.Sequential(nn.Linear(k, n))), pad_bits)
    real_sd, meta_sd = real.state_dict(), meta.state_dict()
    assert real_sd.keys() == meta_sd.keys()
    for name, t in real_sd.items():
        assert meta_sd[name].is_meta and (meta_sd[name].shape, meta_sd[name].dtype) == (t.shape, t.dtype), name
    meta.load_state_dict(real_sd, assign=True)      # what a deployment does with the skeleton
    x = torch.randn(3, k)
    with torch.no_grad():
        assert torch.equal(meta(x), real(x))
