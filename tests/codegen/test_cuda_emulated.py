"""The generated CUDA kernels, run in the host emulator (tests/emu), equal the reference ops bit
for bit: the unchanged kernel sources and the runtime's host wrappers, with only the inline-PTX
primitives (binary MMA fragment semantics, f16x2 compares, prmt, cvt, cp.async) emulated.

This checks index math, fragment layouts, bit orders, identities, padding and epilogues without
a GPU; tests/cuda repeats the same comparisons on the real device.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bwta_compiler import formats
from bwta_compiler.fused_attention import FusedAttentionParams, fused_attention_reference
from bwta_compiler.kernels import GemmParams
from bwta_compiler.ops import bool_thresholds, ternary_thresholds
from bwta_compiler.reference import linear_reference, qbmm_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.emu
from tests.emu import emulator  # noqa: E402

if emulator.compiler() is None:
    pytest.skip("no C++ compiler for the host emulator", allow_module_level=True)

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _emulate(monkeypatch):
    from bwta_compiler.runtime import cuda as rcuda

    monkeypatch.setattr(rcuda, "_HOST_EMULATION", True)
    monkeypatch.setattr(rcuda, "_launch", emulator.emu_launch)


def _x(shape, dtype, s, b=None, act="ternary"):
    x = torch.randn(shape).to(dtype)
    if act == "ternary":
        t = ternary_thresholds(s, 1, dtype)[0]
        vals = torch.stack([t, -t, torch.zeros((), dtype=dtype)])
    elif act == "bool":
        x = x.abs()
        t = bool_thresholds(s, b, 1, dtype)[0]
        vals = torch.stack([t, torch.zeros((), dtype=dtype)])
    else:
        vals = torch.tensor([0.0, -0.0], dtype=dtype)
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 16),))
    flat[idx] = vals[torch.randint(0, vals.numel(), idx.shape)]
    return x


def _scalars(act):
    s = torch.tensor(0.3 + torch.rand(()).item())
    b = torch.tensor(0.1 * torch.randn(()).item()) if act == "bool" else None
    return s, b


LINEAR = [
    # act, K, N, in, out, bias, per_col, tile
    ("ternary", 200, 100, "float16", "float32", False, True, ("mma", 32, 128, 4, 1)),
    ("ternary", 300, 70, "bfloat16", "bfloat16", True, False, ("mma", 16, 64, 2, 2)),
    ("ternary", 100, 40, "float32", "float16", True, True, ("mma", 64, 128, 2, 2)),
    ("bool", 136, 50, "float16", "float16", True, True, ("mma", 8, 64, 1, 2)),
    ("binary", 40, 30, "float16", "float32", False, True, ("mma", 32, 128, 4, 1)),
    ("binary", 520, 33, "float32", "float32", True, True, ("mma", 16, 128, 2, 2)),
    ("ternary", 264, 45, "float16", "float16", True, True, ("popc", 8, 16, 1, 4)),
    ("ternary", 77, 20, "bfloat16", "float32", False, True, ("popc", 1, 16, 1, 4)),
    ("bool", 200, 31, "float32", "bfloat16", False, False, ("popc", 4, 32, 1, 2)),
    ("binary", 100, 17, "float16", "float16", True, True, ("popc", 8, 16, 1, 4)),
]


@pytest.mark.parametrize("case", LINEAR, ids=lambda c: f"{c[7][0]}-{c[0]}-k{c[1]}-n{c[2]}-{c[3]}-{c[4]}")
def test_emulated_linear_equals_reference(case):
    act, k, n, ind, outd, has_bias, per_col, (impl, tm, tn, wm, wn) = case
    p = GemmParams("bb" if act == "binary" else "bt", act, "binary", k=k, kw=formats.num_words(k), n=n,
                   scale_per_col=per_col, has_bias=has_bias, in_dtype=ind, out_dtype=outd, impl=impl,
                   tile_m=tm, tile_n=tn, warps_m=wm, warps_n=wn)
    kern = emulator.emulated_kernel(p)
    s, b = _scalars(act)
    w = formats.pack_binary_codes(torch.where(torch.rand(n, k) < 0.5, -1.0, 1.0))
    scale = torch.rand(n if per_col else 1) + 0.01
    bias = torch.randn(n) if has_bias else None
    for shape in ((1, k), (2, 3, k), (37, k)):
        x = _x(shape, DT[ind], s, b, act)
        got = kern(x, s, b, w, scale, bias, DT[outd])
        want = linear_reference(x, s, b, act, w, k, scale, bias, DT[outd], 64)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), f"{shape}: max |diff| {(got.float() - want.float()).abs().max()}"


QBMM = [
    ("tt", (2,), 19, 21, 64, False, "float16", "float32", "mma"),
    ("tt", (1, 2), 9, 70, 130, False, "bfloat16", "float16", "mma"),
    ("tt", (2,), 9, 13, 100, False, "float32", "float32", "popc"),
    ("ut", (2,), 17, 24, 53, True, "float16", "float32", "mma"),
    ("ut", (1,), 9, 20, 200, False, "float32", "bfloat16", "mma"),
    ("ut", (2,), 5, 16, 77, True, "float16", "float16", "popc"),
    ("bb", (2,), 13, 22, 72, False, "float16", "float32", "mma"),
    ("bb", (1,), 13, 22, 40, True, "bfloat16", "float32", "popc"),
    ("tt", (1,), 70, 66, 128, False, "float16", "float16", "mma64"),   # the GPU tests' 64x64 tiles
]


@pytest.mark.parametrize("case", QBMM, ids=lambda c: f"{c[0]}-{c[8]}-m{c[2]}n{c[3]}k{c[4]}-kn{int(c[5])}-{c[6]}")
def test_emulated_qbmm_equals_reference(case):
    variant, batch, m, n, k, b_kn, ind, outd, impl = case
    a_act, b_act = {"tt": ("ternary", "ternary"), "ut": ("bool", "ternary"), "bb": ("binary", "binary")}[variant]
    tiles = {"tile_m": 32, "tile_n": 32, "warps_m": 2, "warps_n": 2} if impl == "mma" else {"tile_m": 8, "tile_n": 8}
    if impl == "mma64":
        impl, tiles = "mma", {"tile_m": 64, "tile_n": 64, "warps_m": 2, "warps_n": 2}
    p = GemmParams(variant, a_act, b_act, k=k, kw=formats.num_words(k), op="qbmm", b_kn=b_kn, scale_per_col=False,
                   in_dtype=ind, out_dtype=outd, impl=impl, **tiles)
    kern = emulator.emulated_kernel(p)
    a_s, a_b = _scalars(a_act)
    b_s, b_b = _scalars(b_act)
    a = _x((*batch, m, k), DT[ind], a_s, a_b, a_act)
    b = _x((*batch, k, n) if b_kn else (*batch, n, k), DT[ind], b_s, b_b, b_act)
    scale = torch.rand(1) + 0.01
    got = kern(a, a_s, a_b, b, b_s, b_b, scale, None, DT[outd])
    want = qbmm_reference(a, a_act, a_s, a_b, b, b_act, b_s, b_b, b_kn, scale, None, DT[outd], 64)
    assert got.shape == want.shape and torch.equal(got, want), (got.float() - want.float()).abs().max()


ATTN = [
    # B, H, Hkv, T, S, D, Dv, causal, mask, dtype, b_p
    (1, 2, 1, 19, 37, 64, 64, False, False, "float16", 0.0),
    (1, 1, 1, 33, 150, 32, 32, True, False, "float32", 0.0),
    (2, 1, 1, 17, 40, 40, 24, False, True, "bfloat16", 0.0),
    (1, 1, 1, 20, 140, 16, 16, True, True, "float16", -0.05),   # thr < 0: masked keys' bits are 1
    (1, 2, 2, 1, 45, 64, 64, True, False, "float16", 0.0),      # decode step
    (1, 1, 1, 18, 35, 128, 128, True, False, "float16", 0.0),   # the benchmark's head dim (2 warps)
]


@pytest.mark.parametrize("case", ATTN, ids=lambda c: f"b{c[0]}h{c[1]}t{c[3]}s{c[4]}d{c[5]}-c{int(c[7])}m{int(c[8])}-{c[9]}")
def test_emulated_fused_attention_equals_reference(case):
    bsz, h, hkv, t, s, d, dv, causal, mask, dt, bpv = case
    fp = FusedAttentionParams(d, dv, causal=causal, has_mask=mask, in_dtype=dt, out_dtype=dt)
    kern = emulator.emulated_kernel(fp)
    dtype = DT[dt]
    sq, sk, sv = (torch.tensor(0.5 + torch.rand(()).item()) for _ in range(3))
    sp, bp = torch.tensor(0.02 + 0.05 * torch.rand(()).item()), torch.tensor(bpv)
    q = _x((bsz, h, t, d), dtype, sq)
    k = _x((bsz, hkv, s, d), dtype, sk)
    v = _x((bsz, hkv, s, dv), dtype, sv)
    keep = (torch.rand(bsz, s) > 0.2) if mask else None
    got = kern(q, k, v, sq, sk, sv, sp, bp, None, causal, keep, None)
    want = fused_attention_reference(q, k, v, sq, sk, sv, sp, bp, None, causal, keep, None)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_emulated_kernels_through_the_fused_ops():
    """The loaded kernels plug into bwta::linear / bwta::qbmm with the registry signatures."""
    from bwta_compiler import kernel_registry

    k, n = 96, 24
    lin = emulator.emulated_kernel(GemmParams("bt", "ternary", "binary", k=k, kw=formats.num_words(k), n=n,
                                              has_bias=True, in_dtype="float16", out_dtype="float16", impl="popc",
                                              tile_m=8, tile_n=16, warps_n=4))
    kernel_registry.register("emu_linear", lin)
    s, _ = _scalars("ternary")
    x = _x((3, 5, k), torch.float16, s)
    w = formats.pack_binary_codes(torch.where(torch.rand(n, k) < 0.5, -1.0, 1.0))
    scale, bias = torch.rand(n), torch.randn(n)
    got = torch.ops.bwta.linear(x, s, None, "ternary", w, k, scale, bias, torch.float16, 64, "emu_linear")
    want = torch.ops.bwta.linear(x, s, None, "ternary", w, k, scale, bias, torch.float16, 64, "")
    assert torch.equal(got, want)

    qb = emulator.emulated_kernel(GemmParams("ut", "bool", "ternary", k=40, kw=formats.num_words(40), op="qbmm",
                                             b_kn=True, scale_per_col=False, in_dtype="float32",
                                             out_dtype="float32", impl="mma", tile_m=32, tile_n=32, warps_m=2,
                                             warps_n=2))
    kernel_registry.register("emu_qbmm", qb)
    a_s, a_b = _scalars("bool")
    b_s, _ = _scalars("ternary")
    a = _x((2, 9, 40), torch.float32, a_s, a_b, "bool")
    b = _x((2, 40, 16), torch.float32, b_s)
    sc = torch.rand(1)
    got = torch.ops.bwta.qbmm(a, "bool", a_s, a_b, b, "ternary", b_s, None, True, sc, None, torch.float32, 64, "emu_qbmm")
    want = torch.ops.bwta.qbmm(a, "bool", a_s, a_b, b, "ternary", b_s, None, True, sc, None, torch.float32, 64, "")
    assert torch.equal(got, want)
