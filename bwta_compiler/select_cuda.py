"""Table-driven choice of the CUDA kernel variant and tiles per (M bucket, N, K, arch).

The table is data: rows ``{"arch", "m_max", "n_min", "k_min", "impl", "tile_m", "tile_n", "warps_m",
"warps_n"}``, first match wins (rows are sorted by m_max).  The built-in rows are guesses from
the kernel design (popc GEMV for decode, tensor cores from 16 tokens up); a GPU run of
``benchmarks/bench_cuda.py --tune`` writes measured rows to ``benchmarks/results/cuda_select.json``
(or the file named by ``BWTA_CUDA_SELECT_TABLE``), and those replace the guesses for their arch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .kernels import GemmParams

M_BUCKETS = (1, 8, 16, 64, 128, 512, 1 << 30)


@dataclass(frozen=True)
class TileChoice:
    impl: str
    tile_m: int
    tile_n: int
    warps_m: int
    warps_n: int
    source: str = "default"       # "default" (guess) or the measured table's path


# Guesses (no GPU measured yet).  "*" matches any arch.
DEFAULT_ROWS: tuple[dict, ...] = (
    {"arch": "*", "m_max": 1, "impl": "popc", "tile_m": 1, "tile_n": 16, "warps_m": 1, "warps_n": 4},
    {"arch": "*", "m_max": 8, "impl": "popc", "tile_m": 8, "tile_n": 16, "warps_m": 1, "warps_n": 4},
    {"arch": "*", "m_max": 16, "impl": "mma", "tile_m": 16, "tile_n": 128, "warps_m": 2, "warps_n": 2},
    {"arch": "*", "m_max": 128, "impl": "mma", "tile_m": 32, "tile_n": 128, "warps_m": 4, "warps_n": 1},
    {"arch": "*", "m_max": 1 << 30, "impl": "mma", "tile_m": 64, "tile_n": 128, "warps_m": 2, "warps_n": 2},
)

_DEFAULT_TABLE_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "cuda_select.json"


def m_bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def load_table(path: str | None = None) -> tuple[list[dict], str]:
    """Rows of the measured table if one exists (else the defaults), and where they came from."""
    p = Path(path or os.environ.get("BWTA_CUDA_SELECT_TABLE", "") or _DEFAULT_TABLE_PATH)
    if p.is_file():
        try:
            rows = json.loads(p.read_text())["rows"]
            return [dict(r) for r in rows] + list(DEFAULT_ROWS), str(p)
        except (ValueError, KeyError, TypeError):
            pass
    return list(DEFAULT_ROWS), "default"


def choose_linear(m: int, n: int, k: int, arch: str, table: list[dict] | None = None,
                  origin: str = "default") -> TileChoice:
    """The first row (in table order) whose arch, m_max, n_min and k_min fit."""
    if table is None:
        table, origin = load_table()
    for row in table:
        if row.get("arch", "*") not in ("*", arch):
            continue
        if m > row["m_max"] or n < row.get("n_min", 0) or k < row.get("k_min", 0):
            continue
        src = origin if row not in DEFAULT_ROWS else "default"
        return TileChoice(row["impl"], row["tile_m"], row["tile_n"], row["warps_m"], row["warps_n"], src)
    raise LookupError(f"no CUDA tile row for M={m} N={n} K={k} arch={arch}")


def linear_params(base: GemmParams, m_hint: int, arch: str) -> GemmParams:
    """``base`` (variant, acts, K, N, dtypes, epilogue) with the chosen impl and tiles for ``arch``."""
    c = choose_linear(m_hint, base.n, base.k, arch)
    return base.replace(impl=c.impl, tile_m=c.tile_m, tile_n=c.tile_n, warps_m=c.warps_m, warps_n=c.warps_n,
                        isa=arch)


def qbmm_params(base: GemmParams, arch: str, impl: str = "mma") -> GemmParams:
    """Attention MatMuls: 64x64 block tiles on tensor cores, or 16x16 threads on CUDA cores."""
    if impl == "mma":
        return base.replace(op="qbmm", impl="mma", tile_m=64, tile_n=64, warps_m=2, warps_n=2, isa=arch)
    return base.replace(op="qbmm", impl="popc", tile_m=16, tile_n=16, isa=arch)


def write_table(rows: list[dict], path: str, meta: dict) -> None:
    """Write measured rows (used by the benchmark's --tune)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def _infer_op(base: GemmParams) -> str:
    if base.variant in ("tt", "ut") or base.b_act != "binary" or base.n == 0:
        return "qbmm"
    return "linear"


def select_cuda_params(base: GemmParams, cfg=None, m_hint: int = 0, arch: str = "") -> GemmParams:
    """Bridge entry (``runtime_bridge``): fill op, arch and tiles.

    Linear layers get ``impl="auto"``: M is a run-time size, so the loaded kernel picks the table
    row for each call's M (popc GEMV for decode, tensor cores for prefill), compiling each
    variant on first use.  ``m_hint > 0`` fixes one row instead."""
    if not arch:
        arch = _device_arch()
    op = _infer_op(base) if base.op == "linear" else base.op
    base = base.replace(op=op, isa=arch)
    if op == "qbmm":
        return qbmm_params(base, arch, "mma")
    if m_hint > 0:
        return linear_params(base, m_hint, arch)
    return base.replace(impl="auto")


def _device_arch() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm_{major}{minor}"
    except Exception:  # pragma: no cover
        pass
    return "sm_90"
