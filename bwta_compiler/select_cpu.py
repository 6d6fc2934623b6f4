"""Table-driven choice of the CPU kernel parameters: ISA path, register tile and cache block.

One kernel serves every M (tokens are a run-time argument); rows that do not fill a tile run
the 1 x tile_n shape, so decode (M = 1) is a GEMV over the same tile columns.  The table is
keyed by ISA and M bucket; the first row whose ``m_max`` covers ``m_hint`` wins.

Measured basis: BT ternary, K = N = 4096, one thread, CPU time of the calling thread (so the
other jobs sharing this 2-core AMD EPYC (Zen3, AVX2, 32 KiB L1d, 512 KiB L2 per core) do not count),
best of 25 calls, after the nibble-split change.  GMAC/s at M = 1 / 4 / 16 / 64:

    avx2, block_n 96    2x3 173/257/249/244   3x2 174/249/246/254   4x4 174/240/198/225
                        2x2 159/258/231/237
    avx2, 3x2 / 2x3     block_n 32: 172/238/241/236 (3x2), block_n 192: 107/-/-/202 (2x3, M=1 and 64)

Every tile is within ~10 % (the loop is bound by the vector ALUs: 8 ops per 256-bit word pair on
4 pipes, ~128 bit-MACs per cycle, and 254 GMAC/s at 2.45 GHz is ~104 per cycle), so the table
took 3x2, the best at M >= 16, whose 6 byte counters stay in registers (AVX2 has 16 ymm; the
activation operands are re-read from L1 as memory operands, which the load ports absorb).  The
cache block is sized in bytes (BLOCK_BYTES, half of L2), see block_rows below; the kernel shrinks
it at run time so every thread gets at least two blocks.  AVX-512 (VPOPCNTDQ) takes the 4x4 tile of the
prototype in shared/notes/toolchain.md section 3 (16 zmm counters + 8 + 4 operands); it is
compile-checked here but this machine cannot run it, so its row is not measured here.

Since full two-column tiles drain and run their epilogue four outputs at a time (gemm_core's
tile_full_store), taller tiles pay: 6x2 against 3x2, one thread, min CPU time of 9 interleaved
calls, GMAC/s at M = 16 / 512 / 1024: 768x768 114/150/147 vs 107/129/122, 768x3072 189/173/171 vs
160/146/138, 3072x768 249/165/182 vs 240/158/175, 4096x4096 263/213/274 vs 248/201/268 (5x2 is
within noise of 6x2; 7x2 and 8x2 no better; an odd tile_m wastes half of its last row pair).  The
portable path (scalar POPCNT, 16 general registers) measured 64-65 GMAC/s at M = 64 for 2x4 and
4x3 alike.
"""

from __future__ import annotations

import dataclasses

from .config import Config
from .kernels import GemmParams

# (isa, m_max, tile_m, tile_n, block_n); m_max = 0 means "any M"; block_n = 0: from BLOCK_BYTES.
CPU_TABLE: tuple[tuple[str, int, int, int, int], ...] = (
    ("avx512", 0, 4, 4, 0),
    ("avx2", 0, 6, 2, 0),
    ("portable", 0, 2, 4, 0),
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


# Bytes of packed weights per cache block: half the 512 KiB L2 of this machine's cores, so a block
# stays in L2 next to the streaming activation rows (measured at K = N = 4096, 1 thread, CPU time:
# block_n 512 -> 234 / 165 GMAC/s at M = 512 / 2048, block_n 96 -> 178 / 136; at M <= 64 within noise).
BLOCK_BYTES = 256 << 10


def block_rows(kw: int, tile_n: int) -> int:
    """Weight rows per cache block for rows of ``kw`` int32 words (a multiple of tile_n)."""
    rows = max(tile_n, BLOCK_BYTES // max(1, kw * 4))
    return rows // tile_n * tile_n


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
    bn = bn or block_rows(base.kw, tn)
    return dataclasses.replace(base, isa=isa, tile_m=tm, tile_n=tn, block_n=bn, op=op)


def cpu_params(variant: str, a_act: str, b_act: str, n: int, k: int, m_hint: int, in_dtype: str,
               out_dtype: str, cfg: Config, *, has_scale: bool = True, scale_per_col: bool | None = None,
               has_bias: bool = False, b_kn: bool = False, op: str | None = None) -> GemmParams:
    """Build the full CPU ``GemmParams`` from the shape and dtypes (the issue's flat signature)."""
    from .formats import num_words

    op = op or ("linear" if b_act == "binary" and n > 0 else "qbmm")
    per_col = (op == "linear") if scale_per_col is None else scale_per_col
    base = GemmParams(variant=variant, a_act=a_act, b_act=b_act, k=k, kw=num_words(k, cfg.pad_bits), n=n,
                      has_scale=has_scale, scale_per_col=per_col, has_bias=has_bias, in_dtype=in_dtype,
                      out_dtype=out_dtype, b_kn=b_kn, pad_bits=cfg.pad_bits, op=op)
    return select_cpu_params(base, cfg, m_hint)
