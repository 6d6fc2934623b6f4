"""Models written by other people: Hugging Face transformers (BERT-likes, GPT-2 Conv1D, GQA decoders
with sliding windows, T5 relative position bias, ViT, Gemma2 soft-capping), torch's own
nn.TransformerEncoder(Layer) / nn.MultiheadAttention, and a hand-written fused-QKV block at odd
sizes, bf16, batch 1 and dynamic sequence lengths.

Each one: ``quantize`` + ``torch.compile(backend="bwta")`` under ``no_grad`` equals the eager
quantized model (bitwise with ``fallback="eager"``), and the report counts the low-bit MatMuls.
Where the quantized model routes attention through bwta, a float core in its place must give the
model's own float attention (the routing itself must not change the answer)."""

import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from model_zoo import float_routed_mha
from torch import nn

import bwta_compiler as bc
from bwta_compiler.modules import BWTALinear
from bwta_compiler.quantize import QuantConfig, _FloatCore

EAGER = {"fallback": "eager"}


def _out(o):
    if isinstance(o, tuple):
        return o[0]
    for name in ("logits", "last_hidden_state"):
        if getattr(o, name, None) is not None:
            return getattr(o, name)
    return o


def _compiled_equals_eager(model, calls, options=EAGER, quantize=True):
    """quantize (optionally), calibrate on the first call, compile, compare every call; the report."""
    model = model.eval()
    q = bc.quantize(model).eval() if quantize else model
    args, kwargs = calls[0]
    with torch.no_grad():
        q(*args, **kwargs)
        c = torch.compile(q, backend="bwta", options=options)
        for args, kwargs in calls:
            ref, out = _out(q(*args, **kwargs)), _out(c(*args, **kwargs))
            assert out.dtype == ref.dtype and out.shape == ref.shape
            if options.get("fallback") == "eager":
                assert torch.equal(out, ref), (out - ref).abs().max()
            else:
                err = (out.float() - ref.float()).norm() / ref.float().norm()
                assert err < 1e-2, err
    return q, bc.last_report()


def _float_routing_matches(model, calls, keep_float):
    """Quantize only the attention (``keep_float`` names the linears), put float cores behind the
    bwta attention route, and compare with the original float model at the unpadded positions."""
    model = model.eval()
    q = bc.quantize(model, QuantConfig(rules=[(keep_float, "float")])).eval()
    cores = 0
    for mod in q.modules():
        if hasattr(mod, "bwta_core"):
            mod.bwta_core = _FloatCore()
            cores += 1
    assert cores > 0 and not any(isinstance(m, BWTALinear) for m in q.modules())
    with torch.no_grad():
        for args, kwargs in calls:
            ref, out = _out(model(*args, **kwargs)), _out(q(*args, **kwargs))
            keep = kwargs.get("attention_mask")
            if keep is not None and keep.shape == ref.shape[:2]:    # padded query positions: don't-care
                ref, out = ref[keep.bool()], out[keep.bool()]
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _left_padded(b, t):
    m = torch.ones(b, t, dtype=torch.long)
    m[0, :2] = 0
    return m


def _right_padded(b, t):
    m = torch.ones(b, t, dtype=torch.long)
    m[0, t - 2:] = 0
    return m


# ---- Hugging Face transformers ---------------------------------------------------------------

HF_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
HF_FLOAT_LINEARS = r"(proj|mlp|fc|dense|lm_head|embed|query|key|value|lin|wi|wo|\.q$|\.k$|\.v$|\.o$|c_attn|c_fc)"


def _hf(name, attn=None):
    tf = pytest.importorskip("transformers")
    dec = dict(vocab_size=100, num_key_value_heads=2, max_position_embeddings=128, **HF_SMALL)
    cfg = {
        "distilbert": lambda: tf.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=1, n_heads=4,
                                                  max_position_embeddings=64),
        "roberta": lambda: tf.RobertaConfig(vocab_size=100, max_position_embeddings=80, **HF_SMALL),
        "vit": lambda: tf.ViTConfig(image_size=16, patch_size=4, **HF_SMALL),
        "gpt2": lambda: tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0),
        "mistral": lambda: tf.MistralConfig(sliding_window=4, **dec),
        "qwen2": lambda: tf.Qwen2Config(**dec),
        "gemma2": lambda: tf.Gemma2Config(head_dim=8, sliding_window=4, **dec),
        "t5": lambda: tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4),
        "bart": lambda: tf.BartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=64),
    }[name]()
    cls = {"distilbert": tf.DistilBertModel, "roberta": tf.RobertaModel, "vit": tf.ViTModel,
           "gpt2": tf.GPT2LMHeadModel, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
           "gemma2": tf.Gemma2ForCausalLM, "t5": tf.T5Model, "bart": tf.BartModel}[name]
    return cls._from_config(cfg, attn_implementation=attn) if attn else cls(cfg)


def _ids(b, t, lo=0):
    return torch.randint(lo, 90, (b, t))


@pytest.mark.parametrize("name,attn,float_mm", [
    ("distilbert", None, 0),
    ("vit", "eager", 1),              # the pooler stays float by rule
])
def test_hf_encoders_bitwise(name, attn, float_mm):
    model = _hf(name, attn)
    if name == "vit":
        calls = [((torch.randn(2, 3, 16, 16),), {})]
    else:
        calls = [((_ids(2, 7, lo=3),), {"attention_mask": _right_padded(2, 7)})]
    _, rep = _compiled_equals_eager(model, calls)
    assert rep.total == 8 + float_mm and rep.lowbit == 8, str(rep)   # 6 linears + QK + PV, one layer


def test_gpt2_conv1d_layers_are_quantized():
    model = _hf("gpt2")
    q, rep = _compiled_equals_eager(model, [((_ids(2, 7),), {"attention_mask": _right_padded(2, 7)})])
    conv1d = type(model.transformer.h[0].attn.c_attn)
    assert not any(isinstance(m, conv1d) for m in q.modules())
    lin = q.transformer.h[0].attn.c_attn
    assert isinstance(lin, BWTALinear) and (lin.in_features, lin.out_features) == (32, 96)
    assert torch.equal(lin.weight, model.transformer.h[0].attn.c_attn.weight.t())
    assert all(g.lowbit == 6 and len(g.matmuls) == 7 for g in rep.graphs), str(rep)   # lm_head float


@pytest.mark.parametrize("name,attn,lengths", [("qwen2", None, [7])])   # Mistral: routing test below
def test_hf_gqa_decoders_padding_and_lengths(name, attn, lengths):
    model = _hf(name, attn)
    calls = [((_ids(2, 7),), {"attention_mask": _left_padded(2, 7)})] + [((_ids(1, t),), {}) for t in lengths[1:]]
    _, rep = _compiled_equals_eager(model, calls)
    assert rep.graphs and all(g.lowbit == 9 and len(g.matmuls) == 10 for g in rep.graphs), str(rep)


@pytest.mark.parametrize("name,attn", [("t5", None), ("bart", None), ("mistral", "eager"), ("gpt2", None),
                                       ("roberta", None)])
def test_hf_attention_routing_keeps_float_semantics(name, attn):
    # T5 passes its relative position bias to the attention function (dropping it was wrong);
    # Mistral's sliding window (4) is shorter than the sequence.
    model = _hf(name, attn)
    ids = _ids(2, 7)
    kwargs = {"attention_mask": _right_padded(2, 7)}
    if name in ("t5", "bart"):
        kwargs["decoder_input_ids"] = _ids(2, 5)
    _float_routing_matches(model, [((ids,), kwargs), ((ids,), {k: v for k, v in kwargs.items()
                                                               if k != "attention_mask"})], HF_FLOAT_LINEARS)


def test_t5_encoder_decoder_bitwise():
    model = _hf("t5")
    _, rep = _compiled_equals_eager(model, [((_ids(2, 7),), {"attention_mask": _right_padded(2, 7),
                                                             "decoder_input_ids": _ids(2, 5)})])
    assert rep.lowbit == rep.total == 22, str(rep)   # enc 4+2+2, dec 4+2 + 4+2 + 2


def test_gemma2_softcap_runs_float_attention_with_warning():
    model = _hf("gemma2", "eager")
    with pytest.warns(UserWarning, match="softcap"):       # known from the config at quantize time
        q = bc.quantize(model).eval()
    assert [e.choice for e in q.bwta_report if e.kind == "attention"] == ["float"]
    with torch.no_grad():
        q(_ids(2, 7))
    _, rep = _compiled_equals_eager(q, [((_ids(2, 7),), {"attention_mask": _left_padded(2, 7)})], quantize=False)
    assert rep.lowbit == 7 and rep.total == 10, str(rep)     # QK, PV and lm_head float


# ---- torch.nn transformer modules ------------------------------------------------------------


def _kpm(b, s):
    m = torch.zeros(b, s, dtype=torch.bool)
    m[0, s - 2:] = True
    return m


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_layer_with_padding_mask(batch_first):
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first)      # default dropout 0.1
    x = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
    _, rep = _compiled_equals_eager(layer, [((x,), {"src_key_padding_mask": _kpm(2, 7)})])
    assert rep.lowbit == rep.total == 8, str(rep)


def test_transformer_encoder_nested_fast_path_is_off():
    # A float nn.TransformerEncoder would take the nested-tensor fast path with a padding mask,
    # which reads the float weights: the quantized one must run its BWTA layers.
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
    assert enc.use_nested_tensor
    x, kpm = torch.randn(2, 7, 32), _kpm(2, 7)
    q, rep = _compiled_equals_eager(enc, [((x,), {"src_key_padding_mask": kpm})])
    assert rep.lowbit == rep.total == 16, str(rep)
    with torch.no_grad():      # the float fast path would give the float model's answer
        assert not torch.allclose(q(x, src_key_padding_mask=kpm), enc(x, src_key_padding_mask=kpm), atol=1e-2)


def test_transformer_encoder_causal_norm_first():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                                           norm_first=True), 2, enable_nested_tensor=False)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    _, rep = _compiled_equals_eager(enc, [((torch.randn(1, 7, 32),), {"mask": mask, "is_causal": True})])
    assert rep.lowbit == rep.total == 16, str(rep)


def test_transformer_decoder_layer_is_not_redirected_twice():
    # nn.Transformer* forward docstrings mention softmax and matmul: their attention is the
    # swapped nn.MultiheadAttention only (a second, outer quantization of its MatMuls was wrong).
    layer = nn.TransformerDecoderLayer(32, 4, 64, batch_first=True)
    q = bc.quantize(layer)
    assert [e.choice for e in q.bwta_report].count("bwta") == 4
    assert not hasattr(q, "bwta_core") and all(e.kind == "linear" or "MultiheadAttention" not in e.reason
                                               for e in q.bwta_report)
    tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    kwargs = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(5), "tgt_is_causal": True,
              "memory_key_padding_mask": _kpm(2, 7)}
    _, rep = _compiled_equals_eager(q, [((tgt, memory), kwargs)], quantize=False)
    assert len(rep.graphs) == 1 and rep.lowbit == rep.total == 14, str(rep)   # 2 x (4 proj + 2) + 2 linears


class _MHA(nn.Module):
    def __init__(self, batch_first, kdim=None):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)

    def forward(self, q, kv, key_padding_mask=None, attn_mask=None):
        return self.mha(q, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask)[0]


def _mha_inputs(batch_first, b=2, t=5, s=7, kdim=32):
    q = torch.randn(b, t, 32) if batch_first else torch.randn(t, b, 32)
    kv = torch.randn(b, s, kdim) if batch_first else torch.randn(s, b, kdim)
    am = torch.zeros(t, s, dtype=torch.bool)
    am[:, -1] = True
    return q, kv, _kpm(b, s), am


@pytest.mark.parametrize("batch_first,kdim", [(False, None), (True, 24)])
def test_multihead_attention_masks(batch_first, kdim):
    q, kv, kpm, am = _mha_inputs(batch_first, kdim=kdim or 32)
    _, rep = _compiled_equals_eager(_MHA(batch_first, kdim), [((q, kv, kpm, am), {}), ((q, kv), {})])
    assert rep.lowbit == rep.total == 12, str(rep)          # 4 projections + QK + PV, two graphs


def test_multihead_attention_unbatched():
    q, kv, kpm, am = _mha_inputs(False)
    _, rep = _compiled_equals_eager(_MHA(False), [((q[:, 0], kv[:, 0], kpm[0], am), {})])
    assert rep.lowbit == rep.total == 6, str(rep)


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_routing_keeps_float_semantics(batch_first):
    q, kv, kpm, am = _mha_inputs(batch_first, kdim=24)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=24, vdim=24).eval()
    b = float_routed_mha(mha)
    am3 = torch.randn(2 * 4, 5, 7)
    bdim = 0 if batch_first else 1
    with torch.no_grad():
        for kw in ({}, {"key_padding_mask": kpm}, {"attn_mask": am, "key_padding_mask": kpm}, {"attn_mask": am3}):
            torch.testing.assert_close(b(q, kv, kv, **kw)[0], mha(q, kv, kv, **kw)[0], rtol=1e-4, atol=1e-5)
        # unbatched [L, E] inputs
        q1, kv1 = q.select(bdim, 0), kv.select(bdim, 0)
        for kw in ({}, {"key_padding_mask": kpm[0]}, {"attn_mask": am3[:4]}):
            torch.testing.assert_close(b(q1, kv1, kv1, **kw)[0], mha(q1, kv1, kv1, **kw)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16])      # fp32 + inductor: tests/e2e/test_backend.py
def test_multihead_attention_inductor_fallback(dtype):
    # bf16: inductor's decompositions spell the code casts prims.convert_element_type (was 0 low-bit)
    q, kv, kpm, am = _mha_inputs(False)
    _, rep = _compiled_equals_eager(_MHA(False).to(dtype), [((q.to(dtype), kv.to(dtype), kpm, am), {})],
                                    options={"fallback": "inductor"})
    assert rep.lowbit == rep.total == 6, str(rep)


# ---- a hand-written block: fused QKV projection, chunk/split, odd sizes, bf16 ------------------


class FusedQKV(nn.Module):
    def __init__(self, d=32, h=4, split="chunk"):
        super().__init__()
        self.h, self.split = h, split
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x, keep=None):
        b, t, d = x.shape
        y = self.qkv(self.ln(x))
        q, k, v = y.chunk(3, dim=-1) if self.split == "chunk" else y.split(d, dim=-1)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        s = q @ k.transpose(-1, -2) * (d // self.h) ** -0.5
        if keep is not None:
            s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        x = x + self.out((s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(F.gelu(self.ff1(x)))


@pytest.mark.parametrize("d,h,split,shapes,dtype", [
    (32, 4, "chunk", [(2, 7), (2, 12)], torch.float32),      # dynamic sequence length
    (33, 3, "split", [(1, 129)], torch.float32),              # odd hidden, K not a multiple of 64
    (33, 3, "chunk", [(3, 1)], torch.float32),                # one token, batch 3
    (32, 4, "split", [(2, 7)], torch.bfloat16),
])
def test_fused_qkv_block(d, h, split, shapes, dtype):
    model = FusedQKV(d, h, split).to(dtype)
    calls = []
    for b, t in shapes:
        keep = torch.ones(b, t, dtype=torch.bool)
        keep[0, t - 1:] = t == 1           # mask one key of the first row (not the only one)
        calls.append(((torch.randn(b, t, d, dtype=dtype), keep), {}))
    _, rep = _compiled_equals_eager(model, calls)
    assert rep.graphs and all(g.lowbit == len(g.matmuls) == 6 for g in rep.graphs), str(rep)


def test_linear_on_transposed_input_runs_low_bit():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 16)

        def forward(self, x):                  # [T, B, K] -> non-contiguous [B, T, K]: bmm, not mm
            return self.lin(x.transpose(0, 1))

    _, rep = _compiled_equals_eager(M(), [((torch.randn(7, 2, 32),), {})])
    assert rep.lowbit == rep.total == 1, str(rep)


def test_failed_graph_reports_its_matmuls_and_warns():
    from bwta_compiler import passes

    def broken(gm, ctx):
        raise RuntimeError("injected failure")

    broken.__name__ = "fuse_epilogue"
    pipeline = tuple(broken if p.__name__ == "fuse_epilogue" else p for p in passes.PIPELINE)
    with mock.patch.object(passes, "PIPELINE", pipeline), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rep = _compiled_equals_eager(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
                                        [((torch.randn(3, 8),), {})])
    assert any("runs without bwta" in str(w.message) for w in caught)
    assert rep.lowbit == 0 and rep.total == 2 and rep.graphs[0].mode == "failed", str(rep)


def test_failed_graph_counts_a_float_attention_as_two_matmuls():
    """A graph that runs without bwta counts its float SDPA as Q·Kᵀ and P·V, as a compiled graph
    does: the totals of the report do not depend on whether the passes succeeded."""
    from bwta_compiler import passes

    class FloatAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            q = self.proj(x).view(2, 5, 2, 8).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 5, 16)

    calls = [((torch.randn(2, 5, 16),), {})]
    _, ok = _compiled_equals_eager(FloatAttention(), calls, quantize=False)
    assert ok.total == 3 and ok.lowbit == 0, str(ok)      # the linear, Q·Kᵀ and P·V
    compiled_total = ok.total

    def broken(gm, ctx):
        raise RuntimeError("injected failure")

    broken.__name__ = "fuse_epilogue"
    pipeline = tuple(broken if p.__name__ == "fuse_epilogue" else p for p in passes.PIPELINE)
    torch._dynamo.reset()  # the same code object again: compile afresh, with the broken pipeline
    with mock.patch.object(passes, "PIPELINE", pipeline), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, failed = _compiled_equals_eager(FloatAttention(), calls, quantize=False)
    graph = next(g for g in failed.graphs if g.mode == "failed")
    assert len(graph.matmuls) == compiled_total, str(failed)


def test_hf_model_without_attention_interface_is_redirected():
    # Falcon computes its attention itself (not through the AttentionInterface): one plain attention
    # on every path, so it is redirected to BWTA and says how (tests/e2e/test_sweep_others4.py).
    tf = pytest.importorskip("transformers")
    model = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4)).eval()
    q = bc.quantize(model)
    entries = [e for e in q.bwta_report if e.kind == "attention"]
    assert entries and all(e.choice == "bwta" and "AttentionInterface" in e.reason for e in entries)
    assert sum(hasattr(m, "bwta_core") for m in q.modules()) == len(entries)


def test_block_around_a_hand_written_attention_is_not_redirected():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = nn.Linear(32, 96), nn.Linear(32, 32)

        def forward(self, x):
            q, k, v = self.qkv(x).view(*x.shape[:2], 3, 4, 8).permute(2, 0, 3, 1, 4)
            p = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
            return self.o((p @ v).transpose(1, 2).reshape(x.shape))

    class Block(nn.Module):        # a router softmax and a matmul of its own, around the attention
        def __init__(self):
            super().__init__()
            self.attn, self.gate = Attn(), nn.Linear(32, 2)
            self.register_buffer("mix", torch.randn(32, 32))

        def forward(self, x):
            w = torch.softmax(self.gate(x), -1)
            return self.attn(x) * w[..., :1] + (x @ self.mix) * w[..., 1:]

    x = torch.randn(2, 5, 32)
    q, rep = _compiled_equals_eager(Block(), [((x,), {})])
    assert [e.name for e in q.bwta_report if e.kind == "attention" and e.choice == "bwta"] == ["attn"]
    with torch.no_grad():       # the block's own matmul and the attention run once, as written
        w = torch.softmax(q.gate(x), -1)
        assert torch.equal(q(x), q.attn(x) * w[..., :1] + (x @ q.mix) * w[..., 1:])
    assert rep.lowbit == 5 and rep.total == 6, str(rep)     # 3 linears + QK + PV; x @ mix float


class _RotaryAttention(nn.Module):
    """Hand-written attention with rotary embeddings computed inside forward."""

    def __init__(self, outer_by_matmul):
        super().__init__()
        self.outer_by_matmul = outer_by_matmul
        self.qkv, self.o = nn.Linear(32, 96), nn.Linear(32, 32)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
        pos = torch.arange(t, dtype=torch.float32)
        if self.outer_by_matmul:      # [1, 4, 1] @ [1, 1, T], as transformers' rotary embeddings do
            freqs = (self.inv_freq[None, :, None] @ pos[None, None, :]).transpose(1, 2)[0]
        else:
            freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        rot = lambda z: torch.cat((-z[..., 4:], z[..., :4]), dim=-1)
        q, k = q * emb.cos() + rot(q) * emb.sin(), k * emb.cos() + rot(k) * emb.sin()
        p = torch.softmax(q @ k.transpose(-1, -2) * 4.0, dim=-1)     # peaked: P codes are not all 0
        return self.o((p @ v).transpose(1, 2).reshape(b, t, 32))


def test_rotary_outer_product_inside_attention_stays_float():
    by_matmul = _RotaryAttention(True)
    by_mul = _RotaryAttention(False)
    by_mul.load_state_dict(by_matmul.state_dict())
    x = torch.randn(2, 6, 32)
    qa, rep = _compiled_equals_eager(by_matmul, [((x,), {})])
    qb = bc.quantize(by_mul).eval()
    with torch.no_grad():
        qb(x)
        torch.testing.assert_close(qa(x), qb(x))      # the frequencies were not quantized as Q.K
    assert rep.lowbit == 4 and rep.total == 5, str(rep)   # the rotary outer product is the float one
