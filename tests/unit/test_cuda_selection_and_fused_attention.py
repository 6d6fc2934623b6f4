"""CPU checks of the CUDA target's pure-Python parts: the integer-softmax fused-attention
reference (the fused kernel's oracle) against the eager BWTA attention module, and the
table-driven kernel selection."""

from __future__ import annotations

import json

import pytest
import torch

from bwta_compiler import formats, select_cuda
from bwta_compiler.fused_attention import FusedAttentionParams, fused_attention_reference
from bwta_compiler.kernels import GemmParams
from bwta_compiler.modules import BWTAAttention


def _attention(sp=0.05, bp=0.0):
    att = BWTAAttention()
    with torch.no_grad():
        for q, v in ((att.q_quant, 0.8), (att.k_quant, 0.9), (att.v_quant, 0.7), (att.p_quant, sp)):
            q.scale.fill_(v)
            q._init_done = True
        att.p_quant.offset.fill_(bp)
    return att


def _ref(att, q, k, v, **kw):
    return fused_attention_reference(q, k, v, att.q_quant.scale, att.k_quant.scale, att.v_quant.scale,
                                     att.p_quant.scale, att.p_quant.offset, **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_softmax_matches_eager_attention(causal, dtype):
    att = _attention()
    q = torch.randn(2, 4, 37, 64, dtype=dtype)
    k, v = torch.randn(2, 2, 53, 64, dtype=dtype), torch.randn(2, 2, 53, 64, dtype=dtype)
    want = att(q, k, v, is_causal=causal)
    got = _ref(att, q, k, v, is_causal=causal)
    assert got.dtype == want.dtype and got.shape == want.shape
    # Only probabilities within fp32 rounding of the threshold may flip: the outputs agree closely.
    rel = (got.float() - want.float()).norm() / want.float().norm()
    assert rel < 0.02, rel


def test_key_padding_mask_and_decode():
    att = _attention(sp=0.01)
    q = torch.randn(2, 2, 1, 32)
    k, v = torch.randn(2, 2, 70, 32), torch.randn(2, 2, 70, 32)
    keep = torch.rand(2, 70) > 0.3
    mask = torch.zeros(2, 1, 1, 70).masked_fill(~keep.view(2, 1, 1, 70), float("-inf"))
    want = att(q, k, v, attn_mask=mask)
    got = _ref(att, q, k, v, key_keep=keep)
    assert (got - want).norm() / want.norm() < 0.02


def test_negative_offset_sets_bits_of_masked_keys():
    att = _attention(sp=0.02, bp=-0.05)     # threshold < 0: probability 0 is "on"
    q, k, v = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)
    want = att(q, k, v, is_causal=True)
    got = _ref(att, q, k, v, is_causal=True)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)


@pytest.fixture
def guesses_only(tmp_path, monkeypatch):
    monkeypatch.setenv("BWTA_CUDA_SELECT_TABLE", str(tmp_path / "none.json"))


def test_selection_table_defaults_and_buckets(guesses_only):
    c1 = select_cuda.choose_linear(1, 4096, 4096, "sm_90")
    assert c1.impl == "popc" and c1.tile_m == 1 and c1.source == "default"
    assert select_cuda.choose_linear(8, 4096, 4096, "sm_90").impl == "popc"
    big = select_cuda.choose_linear(2048, 4096, 4096, "sm_80")
    assert big.impl == "mma" and big.tile_m % (8 * big.warps_m) == 0 and big.tile_n % (8 * big.warps_n) == 0
    assert [select_cuda.m_bucket(m) for m in (1, 2, 9, 100, 5000)] == [1, 8, 16, 128, 1 << 30]


def test_measured_table_replaces_guesses(tmp_path, monkeypatch):
    path = tmp_path / "cuda_select.json"
    rows = [{"arch": "sm_90", "m_max": 16, "impl": "mma", "tile_m": 8, "tile_n": 64, "warps_m": 1, "warps_n": 2}]
    path.write_text(json.dumps({"meta": {}, "rows": rows}))
    monkeypatch.setenv("BWTA_CUDA_SELECT_TABLE", str(path))
    c = select_cuda.choose_linear(4, 4096, 4096, "sm_90")
    assert (c.impl, c.tile_m, c.tile_n, c.source) == ("mma", 8, 64, str(path))
    assert select_cuda.choose_linear(4, 4096, 4096, "sm_80").impl == "popc"   # other arch: still the guess


def test_select_cuda_params_fills_op_and_impl(guesses_only):
    base = GemmParams("bt", "ternary", "binary", k=768, kw=formats.num_words(768), n=3072)
    p = select_cuda.select_cuda_params(base, None, arch="sm_90")
    assert p.op == "linear" and p.impl == "auto" and p.isa == "sm_90"
    p = select_cuda.select_cuda_params(base, None, m_hint=1, arch="sm_90")
    assert p.impl == "popc"
    tt = GemmParams("tt", "ternary", "ternary", k=64, kw=2)
    q = select_cuda.select_cuda_params(tt, None, arch="sm_80")
    assert q.op == "qbmm" and q.impl == "mma" and q.isa == "sm_80"


def test_fused_attention_params_are_frozen_and_hashable():
    fp = FusedAttentionParams(128, 128, causal=True)
    assert hash(fp) == hash(FusedAttentionParams(128, 128, causal=True))
    with pytest.raises(Exception):
        fp.head_dim = 64  # type: ignore[misc]
