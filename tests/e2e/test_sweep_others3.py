"""Third sweep of transformer code written by other people (GPT-NeoX, Qwen3, Llama with attention
bias, Phi, Gemma, Gemma3, ALBERT, ELECTRA, RemBERT, DINOv2, ViT-MAE, mT5, UMT5, Marian, Pegasus,
Whisper; prefill, KV-cache decode steps and ``generate`` with a compiled forward; hand-written
models): the cases that were wrong or unreported.

* an LM head not named ``lm_head`` (Whisper's ``proj_out``, DistilBERT's ``vocab_projector``,
  ALBERT's ``predictions.decoder``, ELECTRA's ``generator_lm_head``) was binarized although the
  default keeps the LM head float; it is found through ``get_output_embeddings()`` or its weight
  being an nn.Embedding's, and stays float unless a rule names it;
* quantize() copied every weight, so weights tied to other modules (the LM head to the embeddings,
  two layers sharing one weight) were silently untied; the swapped layers now hold the same
  Parameters;
* a layer registered under two names (two parents, or one parent twice) was swapped at its first
  name only and ran float at the other, unlisted;
* a module calling ``F.multi_head_attention_forward`` itself with ``self.out.weight``: ``out`` was
  swapped and reported BWTA but never ran (its float weight was read directly), the module's own
  ``in_proj_weight`` and its attention were not listed;
* a float ``F.scaled_dot_product_attention`` left in a graph (an attention kept float by a rule)
  was not counted: "6 of 6 MatMuls run in low bit" with two float attention MatMuls per layer;
* a fully masked attention row (all ``-inf`` scores: NaN probabilities, or a key padding mask
  masking a whole sequence) made the calibration forward fail inside a code op ("s must be finite")
  because the LSQ scale initialisation averaged the NaNs; it now uses the finite values.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from model_zoo import MatmulSoftmaxBlock, SDPABlock
from torch import nn

import bwta_compiler as bc
from bwta_compiler.modules import BWTALinear
from bwta_compiler.quantize import QuantConfig

EAGER = {"fallback": "eager"}


def _compile_and_compare(q, calls):
    """Calibrate on the first call, compile, check every call bitwise against the eager model."""
    bc.reset_reports()
    with torch.no_grad():
        q(*calls[0][0], **calls[0][1])
        c = torch.compile(q, backend="bwta", options=EAGER)
        for args, kwargs in calls:
            ref, out = q(*args, **kwargs), c(*args, **kwargs)
            ref, out = (getattr(ref, "logits", ref), getattr(out, "logits", out))
            assert torch.equal(out, ref), (out - ref).abs().max()
    return bc.last_report()


# ---- LM heads by any name, tied weights, shared layers -----------------------------------------


def _tf():
    return pytest.importorskip("transformers")


def _hf_heads():
    tf = _tf()
    enc = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    return {
        "distilbert": lambda: tf.DistilBertForMaskedLM(tf.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64,
                                                                           n_layers=1, n_heads=4)),
        "albert": lambda: tf.AlbertForMaskedLM(tf.AlbertConfig(vocab_size=100, embedding_size=16, **enc)),
        "electra": lambda: tf.ElectraForMaskedLM(tf.ElectraConfig(vocab_size=100, embedding_size=16, **enc)),
        "whisper": lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            vocab_size=100, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=8,
            max_target_positions=32, pad_token_id=1, decoder_start_token_id=2, eos_token_id=3, bos_token_id=0)),
    }


@pytest.mark.parametrize("name", ["distilbert", "albert", "electra", "whisper"])
def test_lm_head_by_any_name_stays_float_and_tied(name):
    torch.manual_seed(0)
    model = _hf_heads()[name]().eval()
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    assert "lm_head" not in head.split(".")                      # not caught by the name patterns
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    q = bc.quantize(model)
    entry = next(e for e in q.bwta_report if e.name == head)
    assert entry.choice == "float" and "output embeddings" in entry.reason, entry
    assert type(q.get_submodule(head)) is nn.Linear
    assert q.get_output_embeddings().weight is q.get_input_embeddings().weight
    # A rule naming it quantizes it, and it stays tied to the (float) input embeddings.
    q = bc.quantize(model, QuantConfig(rules=[(rf"^{head}$", "bwta")] + QuantConfig().rules))
    assert isinstance(q.get_submodule(head), BWTALinear)
    assert q.get_output_embeddings().weight is q.get_input_embeddings().weight


class TiedLM(nn.Module):
    """Hand-written LM: the unembedding head's weight is the embedding's, ``up`` and ``up2`` share one weight,
    and ``shared`` is one layer registered under two names (``self.shared`` and ``self.alias``)."""

    def __init__(self, v=50, d=32):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.up, self.up2 = nn.Linear(d, d), nn.Linear(d, d)
        self.up2.weight = self.up.weight
        self.shared = nn.Linear(d, d)
        self.alias = self.shared
        self.unembed = nn.Linear(d, v, bias=False)
        self.unembed.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = self.up2(torch.relu(self.up(h)))
        return self.unembed(self.alias(torch.relu(self.shared(h))))


def test_tied_weights_and_shared_layers_stay_shared():
    torch.manual_seed(0)
    q = bc.quantize(TiedLM().eval())
    assert isinstance(q.shared, BWTALinear) and q.alias is q.shared
    assert "also registered as alias" in next(e.reason for e in q.bwta_report if e.name == "shared")
    assert q.up.weight is q.up2.weight and isinstance(q.up2, BWTALinear)
    assert type(q.unembed) is nn.Linear and q.unembed.weight is q.emb.weight
    head = next(e for e in q.bwta_report if e.name == "unembed")
    assert head.choice == "float" and "tied to embedding emb" in head.reason, head
    rep = _compile_and_compare(q, [((torch.randint(0, 50, (2, 7)),), {}), ((torch.randint(0, 50, (2, 7)),), {})])
    assert rep.lowbit == 4 and rep.total == 5, str(rep)        # up, up2, shared twice; the head float
    # Training keeps the ties: one step moves the tied weights together.
    q.train()
    q(torch.randint(0, 50, (2, 7))).sum().backward()
    with torch.no_grad():
        for p in q.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert q.up.weight is q.up2.weight and q.unembed.weight is q.emb.weight


# ---- F.multi_head_attention_forward and float attention left in the graph ----------------------


class FunctionalMHA(nn.Module):
    """Calls F.multi_head_attention_forward itself with its own in-projection and ``self.out``'s weight."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.in_proj_weight = nn.Parameter(torch.randn(3 * d, d) / math.sqrt(d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out, self.ff = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        y, _ = F.multi_head_attention_forward(x, x, x, x.shape[-1], self.h, self.in_proj_weight, self.in_proj_bias,
                                              None, None, False, 0.0, self.out.weight, self.out.bias,
                                              training=self.training, need_weights=False)
        return self.ff(y)


def test_functional_multi_head_attention_is_reported_float():
    torch.manual_seed(0)
    q = bc.quantize(FunctionalMHA().eval())
    entries = {(e.name, e.kind): e for e in q.bwta_report}
    out = entries[("out", "linear")]
    assert out.choice == "float" and "multi_head_attention_forward" in out.reason and type(q.out) is nn.Linear
    assert entries[("ff", "linear")].choice == "bwta"
    assert entries[("<root>", "attention")].choice == "float"
    assert "in_proj_weight [96, 32]" in entries[("<root>", "linear")].reason
    rep = _compile_and_compare(q, [((torch.randn(7, 2, 32),), {}), ((torch.randn(7, 2, 32),), {})])
    # in-projection, out-projection and the attention's Q·Kᵀ / P·V float; ff low bit.
    assert rep.lowbit == 1 and rep.total == 5, str(rep)
    assert sum("scaled_dot_product" in m.op for m in rep.graphs[0].matmuls) == 2


def test_attention_kept_float_by_rule_is_counted():
    torch.manual_seed(0)
    q = bc.quantize(nn.Sequential(SDPABlock(), SDPABlock()).eval(), QuantConfig(rules=[(r"^0$", "float")]))
    assert [(e.name, e.choice) for e in q.bwta_report if e.kind == "attention"] == [("0", "float"), ("1", "bwta")]
    rep = _compile_and_compare(q, [((torch.randn(2, 7, 32),), {})])
    assert rep.lowbit == 6 and rep.total == 8, str(rep)     # 4 linears + Q·Kᵀ, P·V of block 1; block 0's float
    floats = [m for m in rep.graphs[0].matmuls if not m.lowbit]
    assert all("kept float" in m.reason for m in floats), str(rep)


def test_hf_attention_kept_float_by_rule_is_counted():
    tf = _tf()
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2)).eval()
    q = bc.quantize(model, QuantConfig(rules=[(r"self_attn$", "float")] + QuantConfig().rules))
    rep = _compile_and_compare(q, [((torch.randint(0, 90, (2, 7)),), {})])
    assert rep.lowbit == 7 and rep.total == 10, str(rep)    # 7 linears; lm_head, Q·Kᵀ and P·V float


# ---- fully masked attention rows ---------------------------------------------------------------


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, key_padding_mask):
        return self.mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


def test_fully_masked_rows_calibrate_and_match():
    torch.manual_seed(0)
    mask = torch.zeros(2, 1, 7, 7)
    mask[0, :, 3, :] = float("-inf")                      # one query row sees no key: NaN probabilities
    q = bc.quantize(MatmulSoftmaxBlock().eval())
    rep = _compile_and_compare(q, [((torch.randn(2, 7, 32), mask), {}), ((torch.randn(2, 7, 32), mask), {})])
    assert rep.lowbit == rep.total == 6, str(rep)
    scales = [m.scale for m in q.modules() if isinstance(m, bc.TernaryQuantizer)]
    assert scales and all(torch.isfinite(s) and s > 0 for s in scales)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0] = True                                         # the whole first sequence masked
    q = bc.quantize(_MHA().eval())
    rep = _compile_and_compare(q, [((torch.randn(2, 7, 32), kpm), {}), ((torch.randn(2, 7, 32), kpm), {})])
    assert rep.lowbit == rep.total == 6, str(rep)
    with torch.no_grad():
        out = q(torch.randn(2, 7, 32), kpm)
    assert torch.isfinite(out[1]).all()
