"""Fourth sweep of transformer code written by other people (GPT-2 Conv1D, Falcon, ...): the cases that
were wrong or unreported.

* transformers' ``Conv1D`` layers (GPT-2; weight stored [in, out]) tied to each other were each given
  their own transposed copy of the weight by quantize(), so the tie was silently broken (training
  moved them apart); they now share one [out, in] Parameter.  A Conv1D whose weight is also held by
  something that does not become a BWTA Conv1D with it (an nn.Linear, a layer kept float) stays float
  and says why, instead of being untied;
* Falcon attention stayed float ("does not use transformers' AttentionInterface"): Falcon computes
  attention itself behind ``if alibi`` / ``if _attn_implementation == "sdpa"`` branches, four
  spellings of one plain attention of which one runs.  The single-attention check counted all four
  (two softmaxes, four products) and refused; it now counts per path through the forward, and such a
  layer's MatMuls / its F.scaled_dot_product_attention call are redirected to BWTA attention
  (transformers' "cannot set attention implementation" warning is no longer triggered either);
* attention computed in a method of the module's own (``self._attn(q, k, v, mask)``: OpenAI GPT,
  GPT-Neo) was not seen: OpenAI GPT's attention was not even listed in the quantize report (it ran
  float, "4 of 7 MatMuls"), GPT-Neo's was listed float.  The forward's own methods now count with
  what they compute, and one plain attention in them is redirected;
* a subclass of nn.Linear / nn.MultiheadAttention with its own forward (a LoRA layer adding
  ``B(A(x))``, an MHA subclass adding a relative bias as ``attn_mask``) was swapped for a BWTA module:
  the LoRA branch silently vanished (its A and B were still reported BWTA), the MHA subclass's callers
  crashed (its forward has another signature) or lost the bias.  Such layers now stay float with the
  reason; their submodules are quantized as usual.  Hugging Face's PhiMoE and Llama4 routers are such
  nn.Linear subclasses (their forward returns a tuple): the first forward failed ("too many values
  to unpack").  A subclass whose forward is the plain linear layer (Falcon's FalconLinear) is still
  swapped: its forward is checked on a random input;
* a float nn.MultiheadAttention (kept float by a rule) in a model with BWTA layers ran torch's MHA fast
  path eagerly and the decomposed attention compiled: an ulp apart, which the next ternary quantizer
  turned into different codes, so ``fallback="eager"`` was not bitwise the eager model.  Likewise a
  float nn.TransformerEncoder (``enable_nested_tensor=True``, a ``src_key_padding_mask``) before a
  BWTA layer: eagerly it ran the nested-tensor fast path (zeros at padded positions), compiled it did
  not, and its six float MatMuls were missing from the report ("1 of 1 MatMuls run in low bit");
  in a model with BWTA layers these fast paths are now off for float layers too;
* ``copy.deepcopy`` of a quantized model with a redirected attention (modules calling
  F.scaled_dot_product_attention, Bloom, MPNet, Falcon...) gave a copy that ran the *original's*
  forward (its attention core, its projections): the redirect was a closure over the original module
  (which also made ``torch.save(model)`` fail).  A float nn.MultiheadAttention's new forward (above)
  pickles too.
"""

import copy
import io

import pytest
import torch
from model_zoo import SDPABlock, pass_through_attention_codes
from torch import nn

import bwta_compiler as bc
from bwta_compiler.modules import BWTALinear
from bwta_compiler.quantize import QuantConfig

EAGER = {"fallback": "eager"}


def _compile_and_compare(q, calls, options=EAGER, **compile_kwargs):
    """Calibrate on the first call, compile, check every call bitwise against the eager model."""
    bc.reset_reports()
    with torch.no_grad():
        q(*calls[0][0], **calls[0][1])
        c = torch.compile(q, backend="bwta", options=options, **compile_kwargs)
        for args, kwargs in calls:
            ref, out = q(*args, **kwargs), c(*args, **kwargs)
            for field in ("logits", "last_hidden_state"):
                ref, out = (getattr(ref, field), getattr(out, field)) if hasattr(ref, field) else (ref, out)
            ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
            assert torch.equal(out, ref), (out - ref).abs().max()
    return bc.last_report()


def _tf():
    return pytest.importorskip("transformers")


# ---- GPT-2 Conv1D with tied weights ------------------------------------------------------------


class TiedConv1D(nn.Module):
    """GPT-2-style Conv1D layers: ``a`` and ``b`` share one weight; ``c`` is untied."""

    def __init__(self, d=32):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.a, self.b, self.c = Conv1D(d, d), Conv1D(d, d), Conv1D(48, d)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_conv1d_weights_stay_tied():
    _tf()
    torch.manual_seed(0)
    model = TiedConv1D().eval()
    q = bc.quantize(model)
    assert isinstance(q.a, BWTALinear) and isinstance(q.b, BWTALinear)
    assert q.a.weight is q.b.weight, "tied Conv1D weights were untied"
    assert torch.equal(q.a.weight, model.a.weight.t()) and q.c.weight.shape == (48, 32)
    rep = _compile_and_compare(q, [((torch.randn(2, 5, 32),), {}), ((torch.randn(2, 5, 32),), {})])
    assert rep.lowbit == rep.total == 3, str(rep)
    # One training step moves the tied weight once, for both layers.
    q.train()
    q(torch.randn(2, 5, 32)).sum().backward()
    with torch.no_grad():
        for p in q.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert q.a.weight is q.b.weight


class Conv1DTiedToLinear(nn.Module):
    """A Conv1D whose [in, out] weight is also an nn.Linear's [out, in] weight (the same matrix)."""

    def __init__(self, d=32):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.conv, self.lin = Conv1D(d, d), nn.Linear(d, d)
        self.lin.weight = self.conv.weight

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)))


def test_conv1d_tied_to_a_linear_stays_float_and_tied():
    _tf()
    torch.manual_seed(0)
    q = bc.quantize(Conv1DTiedToLinear().eval())
    entry = next(e for e in q.bwta_report if e.name == "conv")
    assert entry.choice == "float" and "tied to lin (Linear)" in entry.reason, entry
    assert q.lin.weight is q.conv.weight and isinstance(q.lin, BWTALinear)
    rep = _compile_and_compare(q, [((torch.randn(2, 5, 32),), {})])
    assert rep.lowbit == 1 and rep.total == 2, str(rep)


# ---- Falcon: one attention behind four branches ------------------------------------------------


@pytest.mark.parametrize("impl,alibi", [("sdpa", False), ("eager", True)])
def test_falcon_attention_is_routed(impl, alibi, recwarn):
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, alibi=alibi,
                          new_decoder_architecture=False, multi_query=True, attn_implementation=impl)
    q = bc.quantize(tf.FalconForCausalLM(cfg).eval())
    att = [e for e in q.bwta_report if e.kind == "attention"]
    assert [(e.name, e.choice) for e in att] == [("transformer.h.0.self_attention", "bwta")], att
    assert q.config._attn_implementation == impl
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    rep = _compile_and_compare(q, [((ids,), {"attention_mask": mask}), ((torch.randint(0, 100, (2, 7)),), {"attention_mask": mask})])
    # 4 linears + Q·Kᵀ + P·V low bit, the LM head float (per graph).
    assert rep.lowbit == 6 * len(rep.graphs) and rep.total == 7 * len(rep.graphs), str(rep)
    # The redirect computes Falcon's own attention: with pass-through quantizers and float linears
    # the routed model is the float model (masks, ALiBi, multi-query heads included).
    model = tf.FalconForCausalLM(cfg).eval()
    routed = bc.quantize(model, QuantConfig(rules=[(r"(query_key_value|dense|lm_head|embed)", "float")]))
    core = routed.transformer.h[0].self_attention.bwta_core
    for quant in (core.q_quant, core.k_quant, core.v_quant, core.p_quant):
        quant.codes = lambda x: (x, torch.ones((), dtype=x.dtype))
    with torch.no_grad():
        ref, out = model(ids, attention_mask=mask).logits, routed(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


# ---- subclasses with their own forward -------------------------------------------------------


class LoRALinear(nn.Linear):
    def __init__(self, i, o, r=4):
        super().__init__(i, o)
        self.A, self.B = nn.Linear(i, r, bias=False), nn.Linear(r, o, bias=False)

    def forward(self, x):
        return super().forward(x) + self.B(self.A(x)) * 2.0


class BiasedMHA(nn.MultiheadAttention):
    """Adds a learned per-head linear position bias as attn_mask, then calls nn.MultiheadAttention."""

    def __init__(self, d, h):
        super().__init__(d, h, batch_first=True)
        self.rel = nn.Parameter(torch.randn(h, 1, 1))

    def forward(self, x):
        b, t, _ = x.shape
        mask = (self.rel * torch.arange(t, dtype=x.dtype)).expand(self.num_heads, t, t).repeat(b, 1, 1)
        return super().forward(x, x, x, attn_mask=mask, need_weights=False)


class SubclassModel(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.lora, self.att, self.out = LoRALinear(d, d), BiasedMHA(d, 4), nn.Linear(d, d)

    def forward(self, x):
        return self.out(self.att(torch.relu(self.lora(x)))[0])


def test_subclasses_with_their_own_forward_stay_float():
    torch.manual_seed(0)
    model = SubclassModel().eval()
    q = bc.quantize(model)
    entries = {e.name: e for e in q.bwta_report}
    assert type(q.lora) is LoRALinear and entries["lora"].choice == "float", entries["lora"]
    assert "LoRALinear subclasses Linear with its own forward" in entries["lora"].reason
    assert type(q.att) is BiasedMHA and entries["att"].choice == "float", entries["att"]
    assert "BiasedMHA subclasses MultiheadAttention" in entries["att"].reason
    assert isinstance(q.lora.A, BWTALinear) and isinstance(q.lora.B, BWTALinear) and isinstance(q.out, BWTALinear)
    x = torch.randn(2, 7, 32)
    rep = _compile_and_compare(q, [((x,), {}), ((torch.randn(2, 5, 32),), {})])
    # lora.A, lora.B, out low bit; the LoRA base weight, the MHA in/out projections and its Q·Kᵀ, P·V float.
    assert rep.lowbit == 3 * len(rep.graphs) and rep.total == 8 * len(rep.graphs), str(rep)
    # The subclass's own forward still runs: the MHA part is the float model's own.
    with torch.no_grad():
        h = torch.relu(q.lora(x))
        torch.testing.assert_close(q.att(h)[0], model.att(h)[0])


def test_float_multihead_attention_in_a_bwta_model_is_bitwise():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    q = bc.quantize(nn.Sequential(layer).eval(), QuantConfig(rules=[(r"self_attn", "float")]))
    assert isinstance(q[0].linear1, BWTALinear) and type(q[0].self_attn) is nn.MultiheadAttention
    # The attention's float output reaches the layer's output through the residual: an ulp there shows.
    calls = [((torch.randn(2, 7, 32),), {}) for _ in range(3)]
    rep = _compile_and_compare(q, calls)
    assert rep.lowbit == 2 and rep.total == 6, str(rep)    # linear1, linear2; in/out proj, Q·Kᵀ, P·V float
    buf = io.BytesIO()
    torch.save(q, buf)                                      # the float MHA's new forward pickles
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(calls[0][0][0]), q(calls[0][0][0]))


class FloatEncoderThenHead(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 64, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
        self.head = nn.Linear(d, d)

    def forward(self, x, kpm):
        return self.head(self.enc(x, src_key_padding_mask=kpm))


def test_float_nested_tensor_encoder_before_a_bwta_layer():
    torch.manual_seed(0)
    q = bc.quantize(FloatEncoderThenHead().eval(), QuantConfig(rules=[(r"^enc", "float")]))
    kpm = torch.zeros(3, 9, dtype=torch.bool)
    kpm[1, 5:] = kpm[2, 2:] = True
    rep = _compile_and_compare(q, [((torch.randn(3, 9, 32), kpm), {}), ((torch.randn(3, 9, 32), kpm), {})])
    assert rep.lowbit == 1 and rep.total == 7, str(rep)   # the head; in/out proj, Q·Kᵀ, P·V, 2 FFN float


def test_deepcopy_of_redirected_attention_runs_its_own_modules():
    torch.manual_seed(0)
    q = bc.quantize(SDPABlock().eval())
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        q(x)
        twin = copy.deepcopy(q)
        assert torch.equal(twin(x), q(x))
        twin.bwta_core.q_quant.scale.mul_(3.0)            # the copy's own attention scale
        assert not torch.equal(twin(x), q(x))
        twin.proj.bias.add_(1.0)
        ref = q(x)
    assert twin.bwta_core is not q.bwta_core
    buf = io.BytesIO()
    torch.save(twin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), twin(x))
    rep = _compile_and_compare(twin, [((x,), {})])
    assert rep.lowbit == rep.total == 4, str(rep)
    with torch.no_grad():
        assert torch.equal(q(x), ref)


def test_hf_moe_router_subclassing_linear_stays_float():
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.PhimoeConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    q = bc.quantize(tf.PhimoeForCausalLM(cfg).eval())
    router = next(e for e in q.bwta_report if e.name.endswith("mlp.router"))
    assert router.choice == "float" and "PhimoeTopKRouter subclasses Linear" in router.reason, router
    assert type(q.get_submodule(router.name)).__name__ == "PhimoeTopKRouter"
    rep = _compile_and_compare(q, [((torch.randint(0, 100, (2, 5)),), {})])
    # q, k, v, o, Q·Kᵀ, P·V low bit; the router, the experts' two grouped MatMuls and the LM head float.
    assert rep.lowbit == 6 and rep.total == 10, str(rep)


@pytest.mark.parametrize("name", ["openai", "gpt_neo"])
def test_attention_in_a_helper_method_is_redirected(name):
    tf = _tf()
    torch.manual_seed(0)
    if name == "openai":
        model = tf.OpenAIGPTLMHeadModel(tf.OpenAIGPTConfig(vocab_size=100, n_embd=64, n_layer=1, n_head=4, n_positions=64))
        keep_float = r"(c_attn|c_proj|c_fc|lm_head|embed)"
    else:
        model = tf.GPTNeoForCausalLM(tf.GPTNeoConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                                                     attention_types=[[["global", "local"], 1]], window_size=4,
                                                     max_position_embeddings=64))
        keep_float = r"(proj|c_fc|lm_head|embed)"
    model.eval()
    ids, mask = torch.randint(0, 100, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    q = bc.quantize(model)
    att = [e for e in q.bwta_report if e.kind == "attention"]
    assert att and all(e.choice == "bwta" for e in att), att
    # With pass-through quantizers and float linears the redirected model is the float model.
    routed = bc.quantize(model, QuantConfig(rules=[(keep_float, "float")]))
    assert pass_through_attention_codes(routed) == len(att)
    with torch.no_grad():
        ref, out = model(ids, attention_mask=mask).logits, routed(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)
    if name == "openai":
        rep = _compile_and_compare(q, [((ids,), {"attention_mask": mask})])
        assert rep.lowbit == 6 and rep.total == 7, str(rep)      # 4 Conv1D + Q·Kᵀ + P·V; the LM head float
