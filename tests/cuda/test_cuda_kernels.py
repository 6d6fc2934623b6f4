"""Every CUDA variant equals the reference ops bit for bit on fresh random inputs and odd shapes.

No hypothesis here (the GPU image lacks it): shapes are explicit grids, values fresh per test
(tests/conftest.py seeds from os.urandom and prints nothing unless a test fails), with values
placed exactly on the quantizer thresholds to check strict comparisons.
"""

from __future__ import annotations

import pytest
import torch

from bwta_compiler import formats, kernel_registry
from bwta_compiler.fused_attention import FusedAttentionParams, fused_attention_reference
from bwta_compiler.kernels import GemmParams
from bwta_compiler.ops import bool_thresholds, ternary_thresholds
from bwta_compiler.reference import linear_reference, qbmm_reference

pytestmark = pytest.mark.cuda

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEV = "cuda"


def _rt():
    from bwta_compiler.runtime import cuda as rcuda
    return rcuda


def _x(shape, dtype, s, b=None, act="ternary"):
    """Random activations with some entries exactly on the quantizer thresholds."""
    x = torch.randn(shape, device=DEV, dtype=torch.float32).to(dtype)
    if act == "ternary":
        t = ternary_thresholds(s, 1, dtype)[0]
        vals = torch.stack([t, -t, torch.zeros((), dtype=dtype, device=DEV)])
    elif act == "bool":
        x = x.abs()
        t = bool_thresholds(s, b, 1, dtype)[0]
        vals = torch.stack([t, torch.zeros((), dtype=dtype, device=DEV)])
    else:
        vals = torch.tensor([0.0, -0.0], dtype=dtype, device=DEV)
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 16),), device=DEV)
    flat[idx] = vals[torch.randint(0, vals.numel(), idx.shape, device=DEV)]
    return x


def _scalars(act):
    s = torch.tensor(0.3 + torch.rand(()).item(), device=DEV)
    b = torch.tensor(0.1 * torch.randn(()).item(), device=DEV) if act == "bool" else None
    return s, b


LINEAR_CASES = [
    # act, K, N, in, out, has_bias, per_col
    ("ternary", 5120, 384, "float16", "float16", False, True),
    ("ternary", 777, 203, "float16", "float32", True, True),
    ("ternary", 4096, 129, "bfloat16", "bfloat16", True, False),
    ("ternary", 100, 64, "float32", "float32", False, True),
    ("bool", 768, 250, "float16", "float16", True, True),
    ("bool", 33, 17, "float32", "bfloat16", False, True),
    ("binary", 40, 100, "float16", "float16", True, True),
    ("binary", 1000, 77, "bfloat16", "float32", False, True),
]
TILES = [
    ("mma", 32, 128, 4, 1), ("mma", 16, 128, 2, 2), ("mma", 64, 128, 2, 2), ("mma", 8, 64, 1, 2),
    ("popc", 1, 16, 1, 4), ("popc", 8, 16, 1, 4), ("popc", 4, 32, 1, 2),
]


# Each case with one tensor-core and one CUDA-core tile (rotating through TILES): every tile and
# every case runs, in 16 kernels rather than 56 (the GPU check has a time limit).
LINEAR_GRID = [(c, TILES[i % 4]) for i, c in enumerate(LINEAR_CASES)] + \
              [(c, TILES[4 + i % 3]) for i, c in enumerate(LINEAR_CASES)]


@pytest.mark.parametrize("case,tile", LINEAR_GRID,
                         ids=[f"{c[0]}-k{c[1]}-n{c[2]}-{c[3]}-{c[4]}-{t[0]}-{t[1]}x{t[2]}-w{t[3]}x{t[4]}"
                              for c, t in LINEAR_GRID])
def test_linear_equals_reference(case, tile):
    act, k, n, ind, outd, has_bias, per_col = case
    kern = _rt().load_kernel(_linear_params(case, tile))
    s, b = _scalars(act)
    w = formats.pack_binary_codes(torch.where(torch.rand(n, k, device=DEV) < 0.5, -1.0, 1.0))
    scale = (torch.rand(n if per_col else 1, device=DEV) + 0.01)
    bias = torch.randn(n, device=DEV) if has_bias else None
    for m_shape in ((1, k), (3, 5, k), (33, k), (130, k)):
        x = _x(m_shape, DT[ind], s, b, act)
        got = kern(x, s, b, w, scale, bias, DT[outd])
        want = linear_reference(x, s, b, act, w, k, scale, bias, DT[outd], formats.DEFAULT_PAD_BITS)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want), f"M={m_shape}: max |diff| {(got.float() - want.float()).abs().max()}"


def test_linear_auto_dispatch_and_registry():
    rcuda = _rt()
    k, n = 1536, 320
    p = GemmParams("bt", "ternary", "binary", k=k, kw=formats.num_words(k), n=n, in_dtype="float16",
                   out_dtype="float16", impl="auto")
    kern = rcuda.load_kernel(p)
    s, _ = _scalars("ternary")
    w = formats.pack_binary_codes(torch.where(torch.rand(n, k, device=DEV) < 0.5, -1.0, 1.0))
    scale = torch.rand(n, device=DEV)
    kernel_registry.register("test_cuda_auto", kern)
    for m in (1, 5, 16, 100, 600):
        x = _x((m, k), torch.float16, s)
        got = torch.ops.bwta.linear(x, s, None, "ternary", w, k, scale, None, torch.float16, 64, "test_cuda_auto")
        want = linear_reference(x, s, None, "ternary", w, k, scale, None, torch.float16, 64)
        assert torch.equal(got, want), m
    assert len(kern._variants) >= 2  # popc for decode, mma for prefill
    assert kern.name and kern.source and kern.key_lines and kern.artifact_path.endswith(".cubin")


def test_linear_runs_on_current_stream():
    k, n = 512, 128
    p = GemmParams("bt", "ternary", "binary", k=k, kw=formats.num_words(k), n=n, in_dtype="float16",
                   out_dtype="float32", impl="mma", tile_m=32, tile_n=128, warps_m=4, warps_n=1)
    kern = _rt().load_kernel(p)
    s, _ = _scalars("ternary")
    w = formats.pack_binary_codes(torch.where(torch.rand(n, k, device=DEV) < 0.5, -1.0, 1.0))
    scale = torch.rand(n, device=DEV)
    side = torch.cuda.Stream()
    x = _x((64, k), torch.float16, s)
    want = linear_reference(x, s, None, "ternary", w, k, scale, None, torch.float32, 64)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = kern(x, s, None, w, scale, None, torch.float32)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)


QBMM_CASES = [
    # variant, batch, M, N, K, b_kn, in, out, impl
    ("tt", (2, 3), 37, 53, 64, False, "float16", "float16", "mma"),
    ("tt", (1, 4), 128, 128, 128, False, "bfloat16", "float32", "mma"),
    ("tt", (5,), 9, 70, 100, False, "float32", "float32", "popc"),
    ("ut", (2, 3), 37, 64, 53, True, "float16", "float16", "mma"),
    ("ut", (1, 2), 130, 128, 300, True, "float32", "bfloat16", "mma"),
    ("ut", (3,), 17, 40, 77, False, "float16", "float32", "popc"),
    ("bb", (2,), 33, 45, 72, False, "float16", "float32", "mma"),
    ("bb", (2,), 33, 45, 200, True, "bfloat16", "float32", "popc"),
]


@pytest.mark.parametrize("case", QBMM_CASES, ids=lambda c: f"{c[0]}-{c[8]}-m{c[2]}n{c[3]}k{c[4]}-kn{int(c[5])}-{c[6]}")
def test_qbmm_equals_reference(case):
    variant, batch, m, n, k, b_kn, ind, outd, impl = case
    a_act, b_act = ACTS[variant]
    kern = _rt().load_kernel(_qbmm_params(case))
    a_s, a_b = _scalars(a_act)
    b_s, b_b = _scalars(b_act)
    a = _x((*batch, m, k), DT[ind], a_s, a_b, a_act)
    b = _x((*batch, k, n) if b_kn else (*batch, n, k), DT[ind], b_s, b_b, b_act)
    scale = torch.rand(1, device=DEV) + 0.01
    got = kern(a, a_s, a_b, b, b_s, b_b, scale, None, DT[outd])
    want = qbmm_reference(a, a_act, a_s, a_b, b, b_act, b_s, b_b, b_kn, scale, None, DT[outd], 64)
    assert got.shape == want.shape and torch.equal(got, want), (got.float() - want.float()).abs().max()


ATTN_CASES = [
    # B, H, Hkv, T, S, D, Dv, causal, mask, dtype
    (2, 4, 2, 37, 53, 64, 64, False, False, "float16"),
    (1, 2, 2, 130, 130, 128, 128, True, False, "float16"),
    (2, 2, 1, 20, 300, 128, 128, False, True, "bfloat16"),
    (1, 3, 3, 65, 90, 100, 96, True, True, "float32"),
    (1, 2, 2, 1, 257, 64, 64, True, False, "float16"),  # decode step against a KV cache
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}t{c[3]}s{c[4]}d{c[5]}-c{int(c[7])}m{int(c[8])}-{c[9]}")
def test_fused_attention_equals_reference(case):
    bsz, h, hkv, t, s, d, dv, causal, mask, dt = case
    kern = _rt().load_kernel(_attn_params(case))
    dtype = DT[dt]
    sq, sk, sv = (torch.tensor(0.5 + torch.rand(()).item(), device=DEV) for _ in range(3))
    sp = torch.tensor(0.02 + 0.05 * torch.rand(()).item(), device=DEV)
    bp = torch.tensor(0.0, device=DEV)
    q = _x((bsz, h, t, d), dtype, sq)
    k = _x((bsz, hkv, s, d), dtype, sk)
    v = _x((bsz, hkv, s, dv), dtype, sv)
    keep = (torch.rand(bsz, s, device=DEV) > 0.2) if mask else None
    if keep is not None:
        keep[:, 0] = True
    got = kern(q, k, v, sq, sk, sv, sp, bp, None, causal, keep, None)
    want = fused_attention_reference(q, k, v, sq, sk, sv, sp, bp, None, causal, keep, None)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


ACTS = {"tt": ("ternary", "ternary"), "ut": ("bool", "ternary"), "bb": ("binary", "binary")}


def _linear_params(case, tile) -> GemmParams:
    act, k, n, ind, outd, has_bias, per_col = case
    impl, tm, tn, wm, wn = tile
    return GemmParams("bb" if act == "binary" else "bt", act, "binary", k=k, kw=formats.num_words(k), n=n,
                      has_scale=True, scale_per_col=per_col, has_bias=has_bias, in_dtype=ind, out_dtype=outd,
                      impl=impl, tile_m=tm, tile_n=tn, warps_m=wm, warps_n=wn)


def _qbmm_params(case) -> GemmParams:
    variant, batch, m, n, k, b_kn, ind, outd, impl = case
    tiles = {"tile_m": 64, "tile_n": 64, "warps_m": 2, "warps_n": 2} if impl == "mma" else {"tile_m": 16, "tile_n": 16}
    return GemmParams(variant, *ACTS[variant], k=k, kw=formats.num_words(k), op="qbmm", b_kn=b_kn,
                      scale_per_col=False, in_dtype=ind, out_dtype=outd, impl=impl, **tiles)


def _attn_params(case) -> FusedAttentionParams:
    bsz, h, hkv, t, s, d, dv, causal, mask, dt = case
    return FusedAttentionParams(d, dv, causal=causal, has_mask=mask, in_dtype=dt, out_dtype=dt)


@pytest.fixture(scope="module", autouse=True)
def _precompile():
    """Compile every kernel of this module up front, in parallel (NVRTC releases the GIL)."""
    params = [_linear_params(c, t) for c, t in LINEAR_GRID] + [_qbmm_params(c) for c in QBMM_CASES] + \
             [_attn_params(c) for c in ATTN_CASES]
    _rt().precompile(params)


def test_fused_attention_negative_offset_sets_masked_bits():
    # b + s/2 < 0: a masked key's probability 0 is above the threshold, so its bit is 1.
    fp = FusedAttentionParams(64, 64, causal=True, in_dtype="float16", out_dtype="float32")
    kern = _rt().load_kernel(fp)
    sq = sk = sv = torch.tensor(1.0, device=DEV)
    sp, bp = torch.tensor(0.02, device=DEV), torch.tensor(-0.05, device=DEV)
    q, k, v = (torch.randn(1, 2, 40, 64, device=DEV, dtype=torch.float16) for _ in range(3))
    got = kern(q, k, v, sq, sk, sv, sp, bp, 0.125, True, None, torch.float32)
    want = fused_attention_reference(q, k, v, sq, sk, sv, sp, bp, 0.125, True, None, torch.float32)
    assert torch.equal(got, want)


def test_fused_attention_close_to_eager_module():
    from bwta_compiler.modules import BWTAAttention

    att = BWTAAttention().to(DEV)
    with torch.no_grad():
        for qz, v in ((att.q_quant, 0.8), (att.k_quant, 0.9), (att.v_quant, 0.7), (att.p_quant, 0.01)):
            qz.scale.fill_(v)
            qz._init_done = True
    q, k, v = (torch.randn(2, 4, 96, 64, device=DEV) for _ in range(3))
    fp = FusedAttentionParams(64, 64, causal=True, in_dtype="float32", out_dtype="float32")
    got = _rt().load_kernel(fp)(q, k, v, att.q_quant.scale, att.k_quant.scale, att.v_quant.scale, att.p_quant.scale,
                                att.p_quant.offset, None, True, None, None)
    want = att(q, k, v, is_causal=True)
    rel = (got - want).norm() / want.norm().clamp_min(1e-12)
    assert rel < 0.02, rel


def _compile_cuda(model):
    torch._dynamo.reset()
    return torch.compile(model, backend="bwta", options={"target": "cuda", "fallback": "eager"})


def test_compiled_encoder_matches_eager_on_cuda():
    import bwta_compiler as bc
    from bwta_compiler.models import Encoder, EncoderConfig

    m = bc.quantize(Encoder(EncoderConfig.tiny())).to(DEV).eval()
    ids = torch.randint(0, 1000, (2, 33), device=DEV)
    mask = torch.ones(2, 33, device=DEV)
    mask[0, 30:] = 0
    with torch.no_grad():
        m(ids, mask)  # calibrate
        want = m(ids, mask)
        got = _compile_cuda(m)(ids, mask)
    rel = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
    assert rel < 1e-3, rel
    rep = bc.last_report()
    assert rep.lowbit > 0, str(rep)


def test_compiled_decoder_matches_eager_on_cuda():
    import bwta_compiler as bc
    from bwta_compiler.models import Decoder, DecoderConfig

    cfg = DecoderConfig.tiny()
    m = bc.quantize(Decoder(cfg)).to(DEV).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 6), device=DEV)
    with torch.no_grad():
        m(ids)  # calibrate
        want, _ = m(ids)
        got, _ = _compile_cuda(m)(ids)
    rel = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
    assert rel < 1e-3, rel
