"""Generated CPU kernels against the eager reference ops, bit for bit (torch.equal).

Every variant (BT ternary, BT bool, binary-activation linear, TT, UT with and without b_kn, BB)
on every ISA path this CPU runs, fp32/fp16/bf16 inputs, odd shapes (K = 1, 33, 100, 4097;
M = 1, 3, 129; odd N), fresh random inputs each run, with and without scale and bias.  The
AVX-512 path is also rendered and compiled when the CPU lacks it (compile-only).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from bwta_compiler.runtime import compile_cpu, cpu

from bwta_compiler import config, formats, kernel_registry, reference
from bwta_compiler.errors import CompileError
from bwta_compiler.kernels import GemmParams
from bwta_compiler.select_cpu import cpu_params, select_cpu_params

pytestmark = pytest.mark.skipif(not compile_cpu.available(), reason="needs a C compiler")

ISAS = [isa for isa in ("portable", "avx2", "avx512") if compile_cpu.isa_supported(isa)]
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> config.Config:
    return config.resolve({"cache_dir": str(tmp_path_factory.mktemp("cpu-kernels-cache"))})


def _rand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # Spread so every code (-1, 0, +1) occurs, plus exact threshold ties and a few extremes.
    x = torch.randn(shape) * 1.5
    flat = x.view(-1)
    if flat.numel() > 8:
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 16),))
        flat[idx] = torch.tensor([0.35, -0.35, 0.0, -0.0])[torch.arange(idx.numel()) % 4]
    return x.to(dtype)


# ---- linear: (act, in, out, K, N, has_scale, per_col, has_bias, tile) ----------------------
LINEAR_CASES = [
    ("ternary", "float32", "float32", 100, 7, True, True, True, (2, 3)),
    ("ternary", "float16", "float16", 33, 5, True, True, False, (4, 4)),
    ("ternary", "bfloat16", "bfloat16", 4097, 9, True, False, True, (2, 4)),
    ("ternary", "float32", "bfloat16", 1, 3, False, True, False, (1, 4)),
    ("bool", "float32", "float32", 4097, 6, True, True, True, (3, 2)),
    ("bool", "bfloat16", "float32", 100, 11, False, True, True, (2, 3)),
    ("binary", "float32", "float16", 33, 13, True, True, True, (2, 3)),
    ("binary", "float16", "float32", 4097, 4, True, False, False, (4, 1)),
    # Two-column tiles: on AVX2 full tiles take the vector drain + epilogue (tile_full_store);
    # whole vectors only (768), a scalar tail (1100, 300), two counter chunks (8300 > 31 x 256).
    ("ternary", "float32", "float32", 768, 10, True, True, True, (3, 2)),
    ("ternary", "bfloat16", "bfloat16", 1100, 8, True, False, False, (2, 2)),
    ("binary", "float32", "float16", 300, 5, False, True, True, (5, 2)),
    ("bool", "float16", "float32", 2100, 4, True, True, False, (4, 2)),
    ("ternary", "float32", "float32", 8300, 4, True, True, False, (3, 2)),
]


def _linear_params(case, isa: str) -> GemmParams:
    act, din, dout, k, n, has_scale, per_col, has_bias, (tm, tn) = case
    return GemmParams(variant="bb" if act == "binary" else "bt", a_act=act, b_act="binary", k=k,
                      kw=formats.num_words(k), n=n, has_scale=has_scale, scale_per_col=per_col, has_bias=has_bias,
                      in_dtype=din, out_dtype=dout, isa=isa, tile_m=tm, tile_n=tn, op="linear",
                      block_n=0 if k == 4097 else 2 * tn)  # 0 = all of N in one block


def _linear_inputs(case, m_shape: tuple[int, ...]):
    act, din, dout, k, n, has_scale, per_col, has_bias, _ = case
    x = _rand((*m_shape, k), DT[din])
    s = torch.tensor(0.7)
    b = torch.tensor(0.2) if act == "bool" else None
    if act == "bool":
        x = x.abs()
    w = formats.pack_binary_codes(torch.randn(n, k))
    scale = (torch.rand(n if per_col else 1) + 0.1) if has_scale else None
    bias = torch.randn(n).to(DT[dout]) if has_bias else None
    return x, s, b, w, scale, bias, (None if dout == "float32" else DT[dout])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-k{c[3]}-n{c[4]}")
def test_linear_matches_reference(cfg, isa, case) -> None:
    kern = cpu.load_kernel(_linear_params(case, isa), cfg)
    act, k = case[0], case[3]
    for m_shape in [(1,), (3,), (129,), (2, 5), (300,)]:
        x, s, b, w, scale, bias, out_dtype = _linear_inputs(case, m_shape)
        got = kern(x, s, b, w, scale, bias, out_dtype)
        want = reference.linear_reference(x, s, b, act, w, k, scale, bias, out_dtype, 64)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), f"M={m_shape}: {(got != want).sum()} of {got.numel()} outputs differ"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", LINEAR_CASES[:1] + LINEAR_CASES[4:5] + LINEAR_CASES[6:7],
                         ids=lambda c: c[0])
def test_pack_matches_reference(cfg, isa, case) -> None:
    kern = cpu.load_kernel(_linear_params(case, isa), cfg)
    x, s, b, *_ = _linear_inputs(case, (37,))
    want = reference.quantize_pack(x, case[0], s, b, 64)
    assert torch.equal(kern.pack(x, s, b), want)


# ---- qbmm: (variant, a_act, b_act, in, out, K, b_kn, a batch, b batch, scale, bias) ----------
QBMM_CASES = [
    ("tt", "ternary", "ternary", "float32", "float32", 64, False, (2, 3), (2, 3), True, False),
    ("tt", "ternary", "ternary", "bfloat16", "bfloat16", 33, False, (2, 4), (2, 1), True, True),
    ("ut", "bool", "ternary", "float32", "float32", 100, True, (3,), (3,), True, False),
    ("ut", "bool", "ternary", "float16", "float16", 129, False, (2,), (2,), False, True),
    ("ut", "bool", "ternary", "bfloat16", "float32", 1, True, (1, 2), (2, 1), True, False),
    ("bb", "binary", "binary", "float32", "float32", 4097, False, (2,), (2,), True, True),
    # whole 256-bit vectors plus a tail word (300) and whole vectors only (512): both counts of
    # tt / ut go through the vector drain of full tiles on AVX2
    ("tt", "ternary", "ternary", "float32", "float32", 300, True, (2,), (2,), True, True),
    ("ut", "bool", "ternary", "bfloat16", "bfloat16", 512, True, (2,), (1,), True, False),
    # head dim 128 and 64 (two / one word per plane row): the AVX2 short-row path (short_cols4)
    ("tt", "ternary", "ternary", "float32", "float32", 128, True, (2,), (2,), True, True),
    ("ut", "bool", "ternary", "float32", "float16", 64, False, (1, 2), (1, 2), True, True),
]


def _qbmm_inputs(case, m: int, n: int):
    variant, a_act, b_act, din, dout, k, b_kn, ab, bb_, has_scale, has_bias = case
    a = _rand((*ab, m, k), DT[din])
    if a_act == "bool":
        a = a.abs()
    b = _rand((*bb_, k, n) if b_kn else (*bb_, n, k), DT[din])
    a_s, b_s = torch.tensor(0.6), torch.tensor(0.8)
    a_b = torch.tensor(0.1) if a_act == "bool" else None
    scale = torch.tensor([0.37]) if has_scale else None
    bias = torch.randn(n) if has_bias else None
    return a, a_s, a_b, b, b_s, None, scale, bias, (None if dout == "float32" else DT[dout])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", QBMM_CASES, ids=lambda c: f"{c[0]}-{c[3]}-k{c[5]}-kn{int(c[6])}")
def test_qbmm_matches_reference(cfg, isa, case) -> None:
    variant, a_act, b_act, din, dout, k, b_kn, _, _, has_scale, has_bias = case
    params = cpu_params(variant, a_act, b_act, 0, k, 0, din, dout, cfg.replace(cpu_isa=isa), has_scale=has_scale,
                        scale_per_col=False, has_bias=has_bias, b_kn=b_kn)
    kern = cpu.load_kernel(dataclasses.replace(params, tile_m=3, tile_n=2), cfg)
    for m, n in [(1, 5), (3, 1), (129, 17)]:
        a, a_s, a_b, b, b_s, b_b, scale, bias, out_dtype = _qbmm_inputs(case, m, n)
        got = kern(a, a_s, a_b, b, b_s, b_b, scale, bias, out_dtype)
        want = reference.qbmm_reference(a, a_act, a_s, a_b, b, b_act, b_s, b_b, b_kn, scale, bias, out_dtype, 64)
        assert got.shape == want.shape and torch.equal(got, want), f"M={m} N={n}: {(got != want).sum()} differ"


def test_qbmm_reads_strided_b(cfg) -> None:
    """A transposed view of B (no copy) is read through its strides."""
    case = QBMM_CASES[0]
    params = cpu_params("tt", "ternary", "ternary", 0, 64, 0, "float32", "float32", cfg, scale_per_col=False)
    kern = cpu.load_kernel(params, cfg)
    a, a_s, a_b, b, b_s, b_b, scale, bias, od = _qbmm_inputs(case, 7, 9)
    b_t = b.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, non-contiguous
    want = reference.qbmm_reference(a, "ternary", a_s, None, b, "ternary", b_s, None, False, scale, None, None, 64)
    assert torch.equal(kern(a, a_s, a_b, b_t, b_s, b_b, scale, None, None), want)



@pytest.mark.parametrize("variant", ["tt", "ut"])
def test_qbmm_reads_head_split_and_broadcast_operands(cfg, variant: str) -> None:
    """Attention operands as a model hands them over: heads split out of [B, S, H*D] and permuted
    (no copy), K/V shared by a group of query heads (stride-0 broadcast), three batch dims."""
    a_act = "ternary" if variant == "tt" else "bool"
    kern = cpu.load_kernel(cpu_params(variant, a_act, "ternary", 0, 100, 0, "float32", "float32", cfg,
                                      scale_per_col=False, b_kn=True), cfg)
    a_s, b_s, scale = torch.tensor(0.6), torch.tensor(0.8), torch.tensor([0.37])
    a_b = torch.tensor(0.1) if a_act == "bool" else None
    bsz, s, heads, kv_heads, d = 2, 7, 6, 3, 100
    for a, b in [
        # [B, S, H*D] -> [B, H, S, D] and [B, H, D, S] (Kᵀ / Vᵀ read column-wise): permuted views
        (_rand((bsz, s, heads * d), torch.float32).view(bsz, s, heads, d).transpose(1, 2),
         _rand((bsz, 9, heads * d), torch.float32).view(bsz, 9, heads, d).permute(0, 2, 3, 1)),
        # grouped-query: 3 K/V heads expanded to 6 query heads (stride 0 along the group)
        (_rand((bsz, kv_heads, 2, s, d), torch.float32),
         _rand((bsz, kv_heads, 1, d, 9), torch.float32).expand(bsz, kv_heads, 2, d, 9)),
        # broadcast over the batch; A read column-wise (its K dim strided); a plain 3-d / 2-d pair
        (_rand((bsz, heads, s, d), torch.float32), _rand((1, heads, d, 9), torch.float32)),
        (_rand((bsz, heads, d, s), torch.float32).transpose(-1, -2), _rand((bsz, heads, d, 9), torch.float32)),
        (_rand((heads, s, d), torch.float32), _rand((d, 9), torch.float32)),
    ]:
        if a_act == "bool":
            a = a.abs()
        want = reference.qbmm_reference(a, a_act, a_s, a_b, b, "ternary", b_s, None, True, scale, None, None, 64)
        got = kern(a, a_s, a_b, b, b_s, None, scale, None, None)
        assert got.shape == want.shape and torch.equal(got, want), f"{tuple(a.shape)} x {tuple(b.shape)}"

# ---- through the fused op and the registry ------------------------------------------------


def test_threads_do_not_change_results(cfg) -> None:
    """One thread and several threads (dynamic N blocks) give identical outputs."""
    case = ("ternary", "float32", "float32", 1000, 128, True, True, True, (3, 2))
    kern = cpu.load_kernel(_linear_params(case, ISAS[-1]), cfg)
    x, s, b, w, scale, bias, od = _linear_inputs(case, (600,))
    assert 600 * 128 * 16 > cpu.PAR_MIN_WORDS, "big enough for the multi-threaded path"
    want = reference.linear_reference(x, s, b, "ternary", w, 1000, scale, bias, od, 64)
    for threads in (1, 2, 3):
        kern.num_threads = threads
        assert torch.equal(kern(x, s, b, w, scale, bias, od), want), f"{threads} threads"


def test_large_output_on_huge_pages(cfg) -> None:
    """Outputs of 8 MiB and more are advised onto transparent huge pages before the kernel writes
    them (runtime/host_memory.py): the values must be the reference's, the shape and dtype torch's."""
    from bwta_compiler.runtime import host_memory

    case = ("ternary", "float32", "float32", 70, 1100, True, True, True, (6, 2))
    kern = cpu.load_kernel(_linear_params(case, ISAS[-1]), cfg)
    x, s, b, w, scale, bias, od = _linear_inputs(case, (2, 1000))
    got = kern(x, s, b, w, scale, bias, od)
    assert got.numel() * 4 >= host_memory.MIN_ADVISE_BYTES and got.shape == (2, 1000, 1100)
    assert torch.equal(got, reference.linear_reference(x, s, b, "ternary", w, 70, scale, bias, od, 64))
    small = host_memory.empty_output((3, 5), torch.float16)
    assert small.shape == (3, 5) and small.dtype == torch.float16
    assert not host_memory.advise_huge_pages(small), "small tensors are left alone"


def test_fused_linear_op_launches_kernel(cfg) -> None:
    params = cpu_params("bt", "ternary", "binary", 48, 200, 16, "float32", "float32", cfg, has_bias=True)
    kern = cpu.load_kernel(params, cfg)
    kernel_registry.register(kern.name, kern)
    x, s, w = torch.randn(4, 6, 200), torch.tensor(0.5), formats.pack_binary_codes(torch.randn(48, 200))
    scale, bias = torch.rand(48), torch.randn(48)
    got = torch.ops.bwta.linear(x, s, None, "ternary", w, 200, scale, bias, None, 64, kern.name)
    assert torch.equal(got, reference.linear_reference(x, s, None, "ternary", w, 200, scale, bias, None, 64))


# ---- errors -------------------------------------------------------------------------------


def test_shape_mismatch_names_the_tensor(cfg) -> None:
    kern = cpu.load_kernel(_linear_params(LINEAR_CASES[0], ISAS[-1]), cfg)
    x, s, b, w, scale, bias, od = _linear_inputs(LINEAR_CASES[0], (2,))
    with pytest.raises(ValueError, match=r"w_packed .*\(7, 4\)"):
        kern(x, s, b, w[:3], scale, bias, od)
    with pytest.raises(ValueError, match=r"x .*K=99"):
        kern(x[..., :99], s, b, w, scale, bias, od)
    with pytest.raises(ValueError, match="dtype"):
        kern(x.double(), s, b, w, scale, bias, od)


def test_compile_error_carries_log_and_source(cfg, tmp_path) -> None:
    params = _linear_params(LINEAR_CASES[0], "portable")
    source = cpu.make_source(params)
    import hashlib

    (tmp_path / f"{hashlib.sha256(source.encode()).hexdigest()}.c").write_text("this is not C;\n")
    with pytest.raises(CompileError) as err:
        cpu.load_kernel(params, cfg.replace(kernel_override_dir=str(tmp_path)))
    assert err.value.source_path and err.value.source_path.endswith(".c")
    assert "error" in err.value.log


def test_unsupported_isa_is_rejected_before_loading(cfg) -> None:
    if compile_cpu.isa_supported("avx512"):
        pytest.skip("this CPU runs AVX-512")
    with pytest.raises(ValueError, match="cannot run"):
        cpu.load_kernel(_linear_params(LINEAR_CASES[0], "avx512"), cfg)


# ---- rendered sources (FileCheck-style ordered anchors) ------------------------------------


def _check_order(text: str, anchors: list[str]) -> None:
    pos = 0
    for anchor in anchors:
        found = text.find(anchor, pos)
        assert found >= 0, f"anchor {anchor!r} not found after offset {pos}"
        pos = found + len(anchor)


def test_rendered_linear_source_anchors() -> None:
    p = _linear_params(LINEAR_CASES[0], "avx2")
    _check_order(cpu.make_source(p), [
        "#define BWTA_ISA BWTA_ISA_AVX2", '#include "bwta_common.h"', "#define K 100", "#define KW64 2",
        "#define TILE_M 2", "#define TILE_N 3", "#define N 7", "static void a_pack_row", "fv_float32(x",
        "fv_lt(v, -t)", "dst[2 * KW64 + wi] = lo;", "((float *)out)[idx] = y;", "y = y * scale[col];",
        "y = y + bias[col];", "store_float(out, idx, y);",
        "cnt_add_nib(c2[i][j], bv_and(x0[i], sw), bv_and(x1[i], bv_srl4(sw)))",
        "sum_drain(s2[i][j], c2[i][j])", "sc_and_xor(sc_unnib(x0[i], x1[i]), x2[i], y0)",
        "return (i64)apop - 2 * t2;", "t2[i][j] += sum_total(s2[i][j]);",
        "void bwta_linear(", "a_pack(x, 1, 1, m", "#pragma omp parallel", "gemm_block(", "void bwta_pack("])
    assert "tile_full_store" not in cpu.make_source(p)  # 3 columns: the scalar epilogue
    two_col = cpu.make_source(dataclasses.replace(p, tile_m=3, tile_n=2))
    _check_order(two_col, ["static void tile_full_store(", "sum_total4(s2[i][0], s2[i][1], s2[i1][0], s2[i1][1])",
                           "_mm_sub_epi32(base, _mm_slli_epi32(t, 1))", "y = _mm_mul_ps(y, sc);",
                           "y = _mm_add_ps(y, bi);", "static void row_store4(", "row_counts4(a, b, &n1, &n2);",
                           "_mm_loadu_ps(scale + n0)", "_mm_loadu_ps(bias + n0)", "static void gemm_block(",
                           "const i64 m_full = m / TILE_M * TILE_M;", "row_store4(a + r * A_RS",
                           "tile_full_store(a + m0 * A_RS"])
    assert "row_store4" not in cpu.make_source(p)  # decode rows: only with the two-column vector tile
    portable = cpu.make_source(dataclasses.replace(p, isa="portable"))
    _check_order(portable, ["#define BWTA_ISA BWTA_ISA_PORTABLE", "#define A_PLANES 2", "dst[KW64 + wi] = lo;",
                            "bv_and_xor(x0[i], x1[i], y0)", "sc_and_xor(x0[i], x1[i], y0)"])
    assert "cnt_add_nib(" not in portable


@pytest.mark.parametrize("variant,anchors", [
    ("tt", ["static void a_pack_row", "static void b_pack_row", "bv_and(x0[i], y0)", "bv_and_xor(both, x1[i], y1)",
            "return t1 - 2 * t2;", "void bwta_qbmm("]),
    ("ut", ["static void b_pack_row", "bv_and(x0[i], y1)", "return t1 - 2 * t2;", "b_pack(b, nb, nb2, n, b_bs, b_bs2"]),
    ("bb", ["fv_nge0(v)", "bv_xor(x0[i], y0)", "return (i64)K - 2 * t2;", "void bwta_qbmm("]),
])
def test_rendered_qbmm_source_anchors(variant: str, anchors: list[str]) -> None:
    acts = {"tt": ("ternary", "ternary"), "ut": ("bool", "ternary"), "bb": ("binary", "binary")}[variant]
    p = GemmParams(variant=variant, a_act=acts[0], b_act=acts[1], k=64, kw=2, isa="avx512", op="qbmm",
                   out_dtype="bfloat16", scale_per_col=False)
    _check_order(cpu.make_source(p), ["#define BWTA_ISA BWTA_ISA_AVX512", *anchors])
    assert "bwta_f32_to_bf16(y)" in cpu.make_source(p)


@pytest.mark.parametrize("variant", ["bt", "tt", "ut", "bb"])
def test_avx512_sources_compile(tmp_path, variant: str) -> None:
    """The AVX-512 path builds even where this CPU cannot run it (compile-only check)."""
    acts = {"bt": ("ternary", "binary"), "tt": ("ternary", "ternary"), "ut": ("bool", "ternary"),
            "bb": ("binary", "binary")}[variant]
    op = "linear" if variant == "bt" else "qbmm"
    p = GemmParams(variant=variant, a_act=acts[0], b_act=acts[1], k=100, kw=4, n=5 if op == "linear" else 0,
                   isa="avx512", op=op, in_dtype="float16", tile_m=4, tile_n=4)
    (tmp_path / "k.c").write_text(cpu.make_source(p))
    compile_cpu.make_so(tmp_path / "k.c", tmp_path / "k.so", compile_cpu.compile_options("avx512"))
    assert (tmp_path / "k.so").stat().st_size > 0


def test_select_cpu_params_fills_target_fields(cfg) -> None:
    base = GemmParams(variant="bt", a_act="ternary", b_act="binary", k=768, kw=24, n=3072)
    p = select_cpu_params(base, cfg.replace(cpu_isa="avx2"), m_hint=128)
    assert (p.isa, p.op, p.tile_m, p.tile_n) == ("avx2", "linear", 6, 2) and p.block_n > 0
    q = select_cpu_params(dataclasses.replace(base, variant="tt", b_act="ternary", n=0), cfg)
    assert q.op == "qbmm" and q.isa == compile_cpu.detect_isa()
    assert cpu.kernel_name(p).startswith("bt_n3072_k768_")
