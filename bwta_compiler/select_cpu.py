"""Table-driven choice of the CPU kernel parameters: ISA path, register tile and cache block.

One kernel serves every M (tokens are a run-time argument); rows that do not fill a tile run
the 1 x tile_n shape, so decode (M = 1) is a GEMV over the same tile columns.  The table is
keyed by ISA and M bucket; the first row whose ``m_max`` covers ``m_hint`` wins.

Measured basis (/tmp/tiles.py protocol, kept in benchmarks/bench_kernels.py's spirit): BT ternary,
K = N = 4096, one thread, best of 25 calls, AMD EPYC (Zen3, AVX2, 32 KiB L1d, 512 KiB L2 per core)
shared with other jobs, so differences under ~15 % are noise.  GMAC/s at M = 1 / M = 64:

    tile (block_n 96)   1x4 167/123   2x2 147/210   2x3 156/222   2x4 164/214   3x2 160/228
                        4x2 107/182   4x1  94/222   1x8 176/240   4x4 171/242
    block_n 384         1x4 117/159   2x3 153/227   2x4 165/129   4x4 170/256

AVX2 has 16 ymm registers: a tile keeps tile_m x (planes) activation vectors, tile_m x tile_n
byte counters, the nibble table and mask live, so 2x3 (15 live) is the largest tile that never
spills; 4x4 spills counters yet measured as well, because the loop is bound by the vector ALUs
(9 ops per 256-bit word pair), not by loads.  block_n = 96 rows keeps a weight block (96 x 512 B
at K = 4096) inside L2 while all M rows stream past it.  AVX-512 (VPOPCNTDQ) uses the 4x4 tile
of the prototype in shared/notes/toolchain.md section 3 (16 zmm counters, 8 + 4 operand registers);
it is compile-checked here but this machine cannot run it.  The portable path uses 2x4 scalar
words (16 general registers).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from .config import Config
from .kernels import GemmParams

# (isa, m_max, tile_m, tile_n, block_n); m_max = 0 means "any M".
CPU_TABLE: tuple[tuple[str, int, int, int, int], ...] = (
    ("avx512", 0, 4, 4, 128),
    ("avx2", 0, 2, 3, 96),
    ("portable", 0, 2, 4, 128),
)


def resolve_isa(cfg: Config) -> str:
    """``cfg.cpu_isa`` or, for "auto", the best path this CPU runs."""
    if cfg.cpu_isa != "auto":
        return cfg.cpu_isa
    from .runtime.compile_cpu import detect_isa

    return detect_isa()


def choose_tile(isa: str, m_hint: int) -> tuple[int, int, int]:
    """(tile_m, tile_n, block_n) of the first table row for ``isa`` whose m_max covers m_hint."""
    for row_isa, m_max, tm, tn, bn in CPU_TABLE:
        if row_isa == isa and (m_max == 0 or m_hint <= m_max):
            return tm, tn, bn
    raise ValueError(f"no CPU tile table row for isa={isa!r}")


def _infer_op(base: GemmParams) -> str:
    # Linear layers have packed binary weights and a static N; attention operands have N = 0.
    return "linear" if base.b_act == "binary" and base.n > 0 else "qbmm"


def select_cpu_params(base: GemmParams, cfg: Config, m_hint: int = 0) -> GemmParams:
    """``base`` (variant, acts, K, N, dtypes, epilogue) with the CPU ISA, tile and op filled in.

    ``base.op`` is inferred when the caller left the default: N > 0 with binary B is a linear.
    """
    isa = resolve_isa(cfg)
    tm, tn, bn = choose_tile(isa, m_hint)
    op = _infer_op(base) if base.op == "linear" else base.op
    return dataclasses.replace(base, isa=isa, tile_m=tm, tile_n=tn, block_n=bn, op=op)


def cpu_params(variant: str, a_act: str, b_act: str, n: int, k: int, m_hint: int, in_dtype: str,
               out_dtype: str, cfg: Config, *, has_scale: bool = True, scale_per_col: Optional[bool] = None,
               has_bias: bool = False, b_kn: bool = False, op: Optional[str] = None) -> GemmParams:
    """Build the full CPU ``GemmParams`` from the shape and dtypes (the issue's flat signature)."""
    from .formats import num_words

    op = op or ("linear" if b_act == "binary" and n > 0 else "qbmm")
    per_col = (op == "linear") if scale_per_col is None else scale_per_col
    base = GemmParams(variant=variant, a_act=a_act, b_act=b_act, k=k, kw=num_words(k, cfg.pad_bits), n=n,
                      has_scale=has_scale, scale_per_col=per_col, has_bias=has_bias, in_dtype=in_dtype,
                      out_dtype=out_dtype, b_kn=b_kn, pad_bits=cfg.pad_bits, op=op)
    return select_cpu_params(base, cfg, m_hint)
