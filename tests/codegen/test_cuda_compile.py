"""CUDA target without a GPU: every template x Params grid compiles with NVRTC for sm_80 and sm_90,
ptxas reports no spills, the tensor-core kernels' SASS holds AND-popc binary MMA (never the
emulated XOR form), and rendered sources pass FileCheck-style ordered checks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bwta_compiler import formats
from bwta_compiler.errors import CompileError
from bwta_compiler.fused_attention import FusedAttentionParams
from bwta_compiler.kernels import GemmParams

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings not installed")

from bwta_compiler.runtime import compile_cuda
from bwta_compiler.runtime import cuda as rcuda

if not compile_cuda.nvrtc_available():
    pytest.skip("NVRTC library not found", allow_module_level=True)

ARCHS = ("sm_80", "sm_90")
REG_BOUND = {"linear_mma": 128, "linear_popc": 128, "qbmm": 96, "pack": 64, "attn": 200}


def _lin(act, k, ind, outd, impl, tm, tn, wm, wn, **kw):
    return GemmParams("bb" if act == "binary" else "bt", act, "binary", k=k, kw=formats.num_words(k), n=kw.pop("n", 256),
                      in_dtype=ind, out_dtype=outd, impl=impl, tile_m=tm, tile_n=tn, warps_m=wm, warps_n=wn,
                      **kw)


LINEAR = [
    _lin("ternary", 5120, "float16", "float16", "mma", 32, 128, 4, 1),
    _lin("ternary", 4096, "bfloat16", "float32", "mma", 16, 128, 2, 2),
    _lin("bool", 768, "float32", "bfloat16", "mma", 64, 128, 2, 2),
    _lin("binary", 40, "float16", "float16", "mma", 32, 128, 4, 1),
    _lin("ternary", 100, "float16", "float32", "mma", 64, 128, 2, 2, has_bias=True, scale_per_col=False),
    _lin("ternary", 5120, "float16", "float16", "popc", 1, 16, 1, 4),
    _lin("bool", 768, "bfloat16", "float32", "popc", 8, 16, 1, 4, has_bias=True),
    _lin("binary", 40, "float32", "float16", "popc", 8, 16, 1, 4),
    _lin("ternary", 22016, "float16", "float16", "popc", 8, 16, 1, 4),
]


def _qb(variant, k, impl, **kw):
    acts = {"tt": ("ternary", "ternary"), "ut": ("bool", "ternary"), "bb": ("binary", "binary")}[variant]
    tiles = dict(tile_m=64, tile_n=64, warps_m=2, warps_n=2) if impl == "mma" else dict(tile_m=16, tile_n=16)
    return GemmParams(variant, *acts, k=k, kw=formats.num_words(k), op="qbmm", impl=impl, scale_per_col=False,
                      in_dtype=kw.pop("in_dtype", "float16"), out_dtype=kw.pop("out_dtype", "float16"), **tiles, **kw)


QBMM = [
    _qb("tt", 128, "mma"),
    _qb("ut", 2048, "mma", b_kn=True, out_dtype="float32"),
    _qb("bb", 72, "mma", in_dtype="float32"),
    _qb("tt", 64, "popc", in_dtype="bfloat16"),
    _qb("ut", 77, "popc", b_kn=True),
]

ATTN = [
    FusedAttentionParams(128, 128, causal=True),
    FusedAttentionParams(64, 64, has_mask=True, in_dtype="float32", out_dtype="float32"),
    FusedAttentionParams(100, 96, in_dtype="bfloat16", out_dtype="bfloat16"),
]

GRID = [(p, a) for a in ARCHS for p in LINEAR + QBMM + ATTN]


def _kind(fn: str) -> str:
    if "_pack_" in fn:
        return "pack"
    for k in ("linear_mma", "linear_popc", "qbmm", "attn"):
        if k in fn:
            return k
    raise AssertionError(fn)


def _id(pa):
    p, a = pa
    if isinstance(p, FusedAttentionParams):
        return f"{a}-attn-d{p.head_dim}-{p.in_dtype}-{'causal' if p.causal else 'mask' if p.has_mask else 'full'}"
    return f"{a}-{p.op}-{p.variant}-{p.impl}-{p.a_act}-k{p.k}-{p.in_dtype}-{p.out_dtype}-{p.tile_m}x{p.tile_n}"


def _compiled(p, arch):
    p = p.replace(isa=arch)
    return rcuda.compile_params(p, arch=arch)


_RESULTS: dict = {}


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_compiles_without_spills(case):
    p, arch = case
    ck = _compiled(p, arch)
    assert ck.cubin[:4] == b"\x7fELF"
    assert set(ck.resources) == set(ck.ks.functions.values()), ck.log
    for fn, r in ck.resources.items():
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{fn} spills: {r}\n{ck.log}"
        assert r.stack_frame == 0, f"{fn} uses local memory: {r}"
        assert 0 < r.registers <= REG_BOUND[_kind(fn)], f"{fn}: {r.registers} registers"
        _RESULTS[(arch, fn)] = r
    assert Path(ck.source_path).read_text() == ck.ks.source


def test_report_table(capsys):
    """Print the registers/spills table (shown with -s; also written for the closing note)."""
    if not _RESULTS:
        pytest.skip("run with the compile grid")
    lines = [f"{'arch':6s} {'kernel':80s} regs spill_st spill_ld"]
    for (arch, fn), r in sorted(_RESULTS.items()):
        lines.append(f"{arch:6s} {fn:80s} {r.registers:4d} {r.spill_stores:8d} {r.spill_loads:8d}")
    out = os.environ.get("BWTA_CUDA_REPORT")
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _disasm_tool() -> str | None:
    cand = Path(sys.prefix).glob("lib/python3*/site-packages/nvidia/cu13/bin/nvdisasm")
    for c in cand:
        return str(c)
    return shutil.which("nvdisasm")


MMA_CASES = [(p, a) for a in ARCHS for p in (LINEAR[0], LINEAR[3], QBMM[0], QBMM[1], QBMM[2], ATTN[0])]


@pytest.mark.parametrize("case", MMA_CASES, ids=[_id(c) for c in MMA_CASES])
def test_sass_has_and_popc_bmma(case, tmp_path):
    tool = _disasm_tool()
    if tool is None:
        pytest.skip("nvdisasm not installed (pip install nvidia-cuda-nvdisasm)")
    p, arch = case
    ck = _compiled(p, arch)
    cub = tmp_path / "k.cubin"
    cub.write_bytes(ck.cubin)
    sass = subprocess.run([tool, "-c", str(cub)], capture_output=True, text=True, check=True).stdout
    bmma = set(re.findall(r"BMMA\.\S+", sass))
    assert bmma == {"BMMA.88128.AND.POPC"}, bmma
    assert "XOR.POPC" not in sass and "mma_bit_internal" not in sass


def test_popc_variant_has_no_bmma(tmp_path):
    tool = _disasm_tool()
    if tool is None:
        pytest.skip("nvdisasm not installed")
    ck = _compiled(LINEAR[5], "sm_90")
    cub = tmp_path / "k.cubin"
    cub.write_bytes(ck.cubin)
    sass = subprocess.run([tool, "-c", str(cub)], capture_output=True, text=True, check=True).stdout
    assert "BMMA" not in sass and "POPC" in sass


# ---- FileCheck-style ordered checks on rendered sources ---------------------------------------

def filecheck(text: str, checks: list[str], absent: tuple[str, ...] = ()) -> None:
    pos = 0
    for c in checks:
        i = text.find(c, pos)
        assert i >= 0, f"CHECK not found after offset {pos}: {c!r}"
        pos = i + len(c)
    for a in absent:
        assert a not in text, f"CHECK-NOT matched: {a!r}"


NO_HEADERS = ("cuda_fp16.h", "cuda_bf16.h", "s32.xor.popc")


def test_filecheck_linear_mma():
    src = rcuda.kernel_source(LINEAR[0].replace(isa="sm_90")).source
    filecheck(src, ['#include "bwta_common.cuh"', "#define ACT 0", "#define DT 1", "#define K_TRUE 5120",
                    "#define KW 160", "#define TM 32", "#define TN 128",
                    "load_stage(ws[0], w, n0, N, 0);", "bwta_cp_async_commit();",
                    "for (int st = 0; st < NSTAGE; ++st)", "bwta_cp_async_wait<1>();", "__syncthreads();",
                    "bwta_pack_chunk<ACT, DT, VEC>", "cnt[i] += __popc(p) + __popc(q);",
                    "bwta_bmma_and(acc[i][j][0], acc[i][j][1], ap[i], ~s);",
                    "bwta_bmma_and(acc[i][j][0], acc[i][j][1], an[i], s);",
                    "bwta_quad_sum(cnt[i])", "(2 * a - c)", "bwta_store<OT>", "bwta_epilogue(dot"],
              absent=NO_HEADERS)


def test_filecheck_linear_variants():
    src = rcuda.kernel_source(LINEAR[3]).source  # binary act, K=40 (kw=2: 4-byte async copies, tail packing)
    filecheck(src, ["#define ACT 2", "#define VEC 1", "#define KW4 0", "(K_TRUE - 2 * a)"], absent=NO_HEADERS)
    src = rcuda.kernel_source(LINEAR[4]).source  # K=100: unaligned rows -> no vector loads; scalar scale, bias
    filecheck(src, ["#define VEC 0", "#define HAS_SCALE 1", "#define SCALE_PER_COL 0", "#define HAS_BIAS 1"])
    src = rcuda.kernel_source(LINEAR[5]).source
    filecheck(src, ["#define TM 1", "__shared__ u32 sp[TM][KC];", "atomicAdd(&scnt[m], pc)",
                    "__popc(sp[m][wd] & ~s)", "__popc(sn[m][wd] & s)", "bwta_warp_sum"], absent=NO_HEADERS)


def test_filecheck_qbmm_and_attention():
    src = rcuda.kernel_source(QBMM[0]).source
    filecheck(src, ["bwta_pack_operand<0, 1, true, 2, false, false>", "#define VAR_TT 1", "#define KWP 4",
                    "bwta_bmma_and(c0, c1, a0[i], b0[j]);", "bwta_bmma_and(c0, c1, a1[i], b1[j]);",
                    "bwta_bmma_and(c0, c1, a0[i], ~b1[j]);", "bwta_bmma_and(c0, c1, a1[i], ~b0[j]);",
                    "acc[i][j][e] - c"], absent=NO_HEADERS)
    src = rcuda.kernel_source(QBMM[1]).source  # UT with V given [K, N]
    filecheck(src, ["bwta_pack_operand<1, 1, true, 1, false, false>", "bwta_pack_operand<0, 1, false, 2, true, false>",
                    "#define VAR_UT 1", "bwta_bmma_and(c0, c1, a0[i], ~b1[j]);"])
    src = rcuda.kernel_source(ATTN[0].replace(isa="sm_90")).source
    filecheck(src, ["bwta_pack_operand<0, 1, true, 2, false, false>", "bwta_pack_operand<0, 1, false, 2, true, true>",
                    "#define HB (2 * D_TRUE + 1)", "#define CAUSAL 1",
                    "// Pass 1: histogram", "atomicAdd(&hist[warp][i * 8 + r8][s[i][e] + D_TRUE], 1);",
                    "den = __fadd_rn(den, __fmul_rn(", "__fdiv_rn(", "> thr", "// Pass 2",
                    "bits[i] |= (u32)bit << (2 * jt + e);", "bwta_bmma_and(oacc[i][j][0], oacc[i][j][1], bits[i], pv);",
                    "bwta_bmma_and(oacc[i][j][0], oacc[i][j][1], bits[i], ~nv);"],
              absent=NO_HEADERS + ("expf", "__expf"))


def test_header_identities_and_epilogue():
    text = (Path(compile_cuda.header_dir()) / "bwta_common.cuh").read_text()
    filecheck(text, ["#pragma once", "cvt.rn.f16.f32", "cvt.rn.bf16.f32",
                     "if (has_scale) y = __fmul_rn(y, scale);", "if (has_bias) y = __fadd_rn(y, bias);",
                     "set.gt.u32.f16x2", "set.lt.u32.f16x2", "prmt.b32",
                     "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc", "cp.async.cg.shared.global"],
              absent=("s32.xor.popc", "#include <cuda_fp16.h>"))
    # The only include is the host emulator's (tests), behind BWTA_HOST_EMULATION.
    includes = [line for line in text.splitlines() if line.startswith("#include")]
    assert includes == ['#include "bwta_emu_primitives.h"']
    filecheck(text, ["#ifdef BWTA_HOST_EMULATION", '#include "bwta_emu_primitives.h"', "#endif"])


# ---- compile driver -----------------------------------------------------------------------------

def test_compile_error_carries_log_and_path(tmp_path):
    path = tmp_path / "broken.cu"
    src = 'extern "C" __global__ void k() { this is not cuda; }\n'
    path.write_text(src)
    with pytest.raises(CompileError) as ei:
        compile_cuda.compile_source(src, str(path), compile_cuda.CudaOptions(arch="sm_90"))
    assert ei.value.source_path == str(path)
    assert "broken.cu" in ei.value.log and "error" in ei.value.log
    assert str(path) in str(ei.value)


def test_options_and_program_name():
    flags = compile_cuda.CudaOptions(arch="sm_90").flags(("/inc",))
    assert flags[0] == "--gpu-architecture=sm_90" and "-lineinfo" in flags and "-Xptxas=-v" in flags
    assert "-I/inc" in flags
    with pytest.raises(ValueError):
        compile_cuda.CudaOptions(arch="compute_90; rm").flags(())


def test_parse_ptxas_log():
    log = ("ptxas info    : 0 bytes gmem\n"
           "ptxas info    : Compiling entry function 'kern_a' for 'sm_90'\n"
           "ptxas info    : Function properties for kern_a\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem\n")
    r = compile_cuda.parse_ptxas_log(log)["kern_a"]
    assert (r.registers, r.spill_stores, r.spill_loads, r.stack_frame, r.shared_bytes) == (40, 4, 4, 8, 2048)


def test_cache_hit_second_time():
    p = LINEAR[7].replace(isa="sm_90")
    a = rcuda.compile_params(p, arch="sm_90")
    b = rcuda.compile_params(p, arch="sm_90")
    assert b.cache_hit and a.cubin == b.cubin
    assert any(line.startswith("arch: sm_90") for line in b.key_lines)
    assert any("nvrtc-" in line for line in b.key_lines)


def test_importing_package_does_not_import_cuda_python():
    # torch itself may import cuda.bindings.driver; bwta must add nothing to that (no nvrtc).
    code = ("import sys, torch; base={m for m in sys.modules if m.startswith('cuda')};"
            "import bwta_compiler, bwta_compiler.select_cuda, bwta_compiler.fused_attention;"
            "import bwta_compiler.runtime.cuda, bwta_compiler.runtime.compile_cuda;"
            "bad=sorted({m for m in sys.modules if m.startswith('cuda')} - base); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_available_is_false_without_driver():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert rcuda.available() is False
    with pytest.raises(RuntimeError, match="no CUDA device"):
        rcuda.load_kernel(LINEAR[0])
