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
  (transformers' "cannot set attention implementation" warning is no longer triggered either).
"""

import pytest
import torch
from torch import nn

import bwta_compiler as bc
from bwta_compiler.modules import BWTALinear

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
    rep = _compile_and_compare(q, [((torch.randn(2, 5, 32),), {}), ((torch.randn(1, 3, 32),), {})])
    assert rep.lowbit == rep.total == 6, str(rep)
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
    rep = _compile_and_compare(q, [((ids,), {}), ((torch.randint(0, 100, (2, 7)),), {"attention_mask": mask})])
    # 4 linears + Q·Kᵀ + P·V low bit, the LM head float (per graph).
    assert rep.lowbit == 6 * len(rep.graphs) and rep.total == 7 * len(rep.graphs), str(rep)
