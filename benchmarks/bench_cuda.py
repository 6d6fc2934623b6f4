"""Kernel benchmark of the CUDA target against cuBLAS fp16 / torch SDPA (run by scripts/gpu_check.sh).

Times with CUDA events: warm-up, then the median of many runs (each run between its own event
pair), inputs random and non-zero.  Prints one table and writes
``benchmarks/results/gpu_<date>.json`` and ``.md`` (GPU name, driver, torch, arch).  ``--tune``
also measures the tile table rows per M bucket and writes ``benchmarks/results/cuda_select.json``,
which ``bwta_compiler.select_cuda`` then prefers over its guesses.

Stops starting new measurements once ``--budget-s`` seconds have passed (the table says which
rows were skipped), so the whole GPU check fits its time limit.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bwta_compiler.runtime import cuda as rcuda

from bwta_compiler import formats
from bwta_compiler.fused_attention import FusedAttentionParams
from bwta_compiler.kernels import GemmParams
from bwta_compiler.select_cuda import write_table

PAPER_SHAPES = [(13824, 5120), (5120, 13824), (22016, 8192), (8192, 22016)]  # (rows, K) at N=128 tokens
MODEL_SHAPES = {
    "bert-base": [(768, 768), (3072, 768), (768, 3072)],
    "llama-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
}
MS = (1, 16, 128, 2048)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0 = time.time()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)

    def ok(self) -> bool:
        return self.left() > 0


def time_ms(fn, warmup: int = 5, reps: int = 30, max_s: float = 2.0, inner: int = 10) -> float:
    """Median ms per call.  The call is captured ``inner`` times into a CUDA graph and each replay
    is timed between its own pair of CUDA events, so Python launch overhead (ours: ctypes +
    cuLaunchKernel; the baseline's: torch dispatch) is not counted; falls back to timing eager
    calls when capture fails."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run, per = fn, 1
    try:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=stream):
                for _ in range(inner):
                    fn()
        torch.cuda.current_stream().wait_stream(stream)
        g.replay()
        torch.cuda.synchronize()
        run, per = g.replay, inner
    except Exception as e:  # capture unsupported for this call: time eager calls instead
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:80]}; timing eager calls)")
        torch.cuda.synchronize()
    times = []
    t_start = time.time()
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per)
        if time.time() - t_start > max_s and len(times) >= 5:
            break
    return statistics.median(times)


def gpu_info() -> dict:
    info = {"gpu": torch.cuda.get_device_name(), "capability": rcuda.device_arch(), "torch": torch.__version__,
            "python": platform.python_version(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        from cuda.bindings import driver
        err, v = driver.cuDriverGetVersion()
        info["cuda_driver_api"] = f"{v // 1000}.{(v % 1000) // 10}"
    except Exception as e:  # pragma: no cover
        info["cuda_driver_api"] = f"unknown ({e})"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            info["nvidia_smi"] = out.strip()
            info["driver"] = out.split(",")[0].strip()
        except Exception:
            pass
    from bwta_compiler.runtime.compile_cuda import nvrtc_version_string
    info["nvrtc"] = nvrtc_version_string()
    return info


def linear_params(rows: int, k: int, impl: str, tm: int, tn: int, wm: int, wn: int) -> GemmParams:
    return GemmParams("bt", "ternary", "binary", k=k, kw=formats.num_words(k), n=rows, in_dtype="float16",
                      out_dtype="float16", impl=impl, tile_m=tm, tile_n=tn, warps_m=wm, warps_n=wn)


def bench_linear(m: int, rows: int, k: int, configs: list[tuple], results: list, label: str, budget: Budget) -> dict:
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    w16 = torch.randn(rows, k, device=dev, dtype=torch.float16)
    wp = formats.pack_binary_codes(torch.where(w16 >= 0, 1.0, -1.0))
    s = torch.tensor(0.7, device=dev)
    scale = torch.rand(rows, device=dev) + 0.1
    row = {"kind": "linear", "label": label, "M": m, "N": rows, "K": k}
    row["cublas_fp16_ms"] = time_ms(lambda: torch.matmul(x, w16.t()))
    best = None
    for cfg in configs:
        if not budget.ok():
            row["skipped"] = "budget"
            break
        impl, tm, tn, wm, wn = cfg
        kern = rcuda.load_kernel(linear_params(rows, k, impl, tm, tn, wm, wn))
        ms = time_ms(lambda: kern(x, s, None, wp, scale, None, torch.float16))
        key = f"{impl}_{tm}x{tn}_w{wm}x{wn}"
        row[f"{key}_ms"] = ms
        if impl in ("mma", "popc"):
            row[f"best_{impl}_ms"] = min(row.get(f"best_{impl}_ms", math.inf), ms)
        if best is None or ms < best[0]:
            best = (ms, cfg)
    if best:
        row["bwta_ms"] = best[0]
        row["best_cfg"] = list(best[1])
        row["speedup_vs_cublas"] = row["cublas_fp16_ms"] / best[0]
        if "best_mma_ms" in row and "best_popc_ms" in row:
            row["mma_over_popc_speed"] = row["best_popc_ms"] / row["best_mma_ms"]
    results.append(row)
    return row


def bench_attention(batch: int, results: list, budget: Budget, seq: int = 2048, heads: int = 32, d: int = 128) -> None:
    import torch.nn.functional as F

    dev, dt = "cuda", torch.float16
    q, k, v = (torch.randn(batch, heads, seq, d, device=dev, dtype=dt) for _ in range(3))
    sq = sk = sv = torch.tensor(0.6, device=dev)
    sp, bp = torch.tensor(0.002, device=dev), torch.tensor(0.0, device=dev)
    row = {"kind": "attention", "label": f"attn b{batch} s{seq} h{heads}x{d}", "B": batch, "S": seq}
    row["sdpa_fp16_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), reps=20)
    row["sdpa_causal_fp16_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps=20)
    for causal in (False, True):
        if not budget.ok():
            row["skipped"] = "budget"
            break
        kern = rcuda.load_kernel(FusedAttentionParams(d, d, causal=causal, in_dtype="float16", out_dtype="float16"))
        ms = time_ms(lambda: kern(q, k, v, sq, sk, sv, sp, bp, None, causal, None, None), reps=20)
        tag = "causal_" if causal else ""
        row[f"fused_{tag}ms"] = ms
        row[f"fused_{tag}speedup_vs_sdpa"] = row[f"sdpa_{tag}fp16_ms"] / ms
    results.append(row)

    # Unfused Q.K^T (TT) and P.V (UT) against cuBLAS fp16 bmm.
    if not budget.ok():
        return
    row2 = {"kind": "attention_mm", "label": f"QK^T / PV b{batch}", "B": batch, "S": seq}
    qf, kf = q.reshape(-1, seq, d), k.reshape(-1, seq, d)
    row2["qk_cublas_ms"] = time_ms(lambda: torch.bmm(qf, kf.transpose(1, 2)), reps=10, inner=1)
    tt = GemmParams("tt", "ternary", "ternary", k=d, kw=formats.num_words(d), op="qbmm", scale_per_col=False,
                    in_dtype="float16", out_dtype="float16", impl="mma", tile_m=64, tile_n=64, warps_m=2, warps_n=2)
    kt = rcuda.load_kernel(tt)
    one = torch.ones(1, device=dev)
    row2["qk_bwta_ms"] = time_ms(lambda: kt(qf, sq, None, kf, sk, None, one, None, torch.float16), reps=10, inner=1)
    row2["qk_speedup"] = row2["qk_cublas_ms"] / row2["qk_bwta_ms"]
    if budget.ok():
        p = torch.rand(qf.shape[0], seq, seq, device=dev, dtype=dt)
        vf = v.reshape(-1, seq, d)
        row2["pv_cublas_ms"] = time_ms(lambda: torch.bmm(p, vf), reps=10, inner=1)
        ut = GemmParams("ut", "bool", "ternary", k=seq, kw=formats.num_words(seq), op="qbmm", scale_per_col=False,
                        b_kn=True, in_dtype="float16", out_dtype="float16", impl="mma", tile_m=64, tile_n=64,
                        warps_m=2, warps_n=2)
        ku = rcuda.load_kernel(ut)
        row2["pv_bwta_ms"] = time_ms(lambda: ku(p, sp, bp, vf, sv, None, one, None, torch.float16), reps=10, inner=1)
        row2["pv_speedup"] = row2["pv_cublas_ms"] / row2["pv_bwta_ms"]
        del p
    results.append(row2)


def fmt_table(results: list) -> str:
    lines = ["| kind | shape | baseline ms | bwta ms | speedup | notes |", "|---|---|---|---|---|---|"]
    for r in results:
        if r["kind"] == "linear":
            note = f"cfg {r.get('best_cfg')}"
            if "mma_over_popc_speed" in r:
                note += f"; mma {r['best_mma_ms']:.4f} vs popc {r['best_popc_ms']:.4f} ms"
            if r.get("skipped"):
                note += "; some configs skipped (budget)"
            lines.append(f"| linear {r['label']} | M={r['M']} N={r['N']} K={r['K']} | {r['cublas_fp16_ms']:.4f} (cuBLAS fp16) "
                         f"| {r.get('bwta_ms', float('nan')):.4f} | {r.get('speedup_vs_cublas', float('nan')):.2f}x | {note} |")
        elif r["kind"] == "attention":
            for tag, base in (("", "sdpa_fp16_ms"), ("causal_", "sdpa_causal_fp16_ms")):
                if f"fused_{tag}ms" in r:
                    lines.append(f"| fused attention {tag.rstrip('_') or 'full'} | {r['label']} | {r[base]:.4f} (SDPA fp16) "
                                 f"| {r[f'fused_{tag}ms']:.4f} | {r[f'fused_{tag}speedup_vs_sdpa']:.2f}x | |")
        elif r["kind"] == "error":
            lines.append(f"| ERROR | {r['label']} | | | | {r['error'][:120]} |")
        else:
            for part in ("qk", "pv"):
                if f"{part}_bwta_ms" in r:
                    lines.append(f"| {'Q.K^T (TT)' if part == 'qk' else 'P.V (UT)'} | {r['label']} | "
                                 f"{r[f'{part}_cublas_ms']:.4f} (cuBLAS bmm fp16) | {r[f'{part}_bwta_ms']:.4f} | "
                                 f"{r[f'{part}_speedup']:.2f}x | includes quantize+pack |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--tune", action="store_true", help="write measured tile rows to results/cuda_select.json")
    ap.add_argument("--quick", action="store_true", help="paper shapes and attention only")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available() or not rcuda.available():
        print("bench_cuda: no CUDA device; nothing to do")
        return 2
    budget = Budget(args.budget_s)
    info = gpu_info()
    info["stamp"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d_%H%M%S")
    print("bench_cuda:", json.dumps(info))
    results: list = []

    mma_cfgs = [("mma", 32, 128, 4, 1), ("mma", 64, 128, 2, 2), ("mma", 16, 128, 2, 2)]
    popc_cfgs = [("popc", 8, 16, 1, 4), ("popc", 1, 16, 1, 4)]

    # Compile every kernel of the run up front, in parallel threads (NVRTC releases the GIL).
    t_pc = time.time()
    pre = [linear_params(r, k, *c) for r, k in PAPER_SHAPES for c in mma_cfgs + popc_cfgs[:1]]
    if not args.quick:
        pre += [linear_params(r, k, *c) for shapes in MODEL_SHAPES.values() for r, k in shapes
                for c in mma_cfgs + popc_cfgs]
    pre += [FusedAttentionParams(128, 128, causal=c, in_dtype="float16", out_dtype="float16") for c in (False, True)]
    n_pre = rcuda.precompile(pre)
    print(f"bench_cuda: {n_pre}/{len(pre)} kernels compiled or cached in {time.time() - t_pc:.1f}s")

    def guarded(what: str, fn, *a) -> None:
        # One failing measurement must not cost the rest of the run (device time is scarce).
        try:
            fn(*a)
            save(results, info, budget, args)
        except Exception as e:  # noqa: BLE001
            print(f"bench_cuda: {what} failed: {type(e).__name__}: {e}")
            results.append({"kind": "error", "label": what, "error": f"{type(e).__name__}: {e}"[:500]})
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # 1. The paper author's shapes (N = 128 tokens), mma and popc: is binary MMA native on this arch?
    for rows, k in PAPER_SHAPES:
        if budget.ok():
            guarded(f"linear paper {rows}x{k}", bench_linear, 128, rows, k, mma_cfgs + popc_cfgs[:1], results,
                    "paper", budget)
    # 2. Attention at seq 2048, 32 heads of 128, batch 1 and 16.
    for b in (1, 16):
        if budget.ok():
            guarded(f"attention b{b}", bench_attention, b, results, budget)
            torch.cuda.empty_cache()
    # 3. BERT-base and LLaMA-7B shapes at M in {1, 16, 128, 2048}.
    if not args.quick:
        for model, shapes in MODEL_SHAPES.items():
            for rows, k in shapes:
                for m in MS:
                    if not budget.ok():
                        break
                    cfgs = popc_cfgs + mma_cfgs[2:] if m <= 16 else mma_cfgs
                    guarded(f"linear {model} M={m} {rows}x{k}", bench_linear, m, rows, k,
                            cfgs if args.tune else cfgs[:2], results, model, budget)

    save(results, info, budget, args, final=True)
    return 0


def save(results: list, info: dict, budget: Budget, args, final: bool = False) -> None:
    """Write gpu_<stamp>.json/.md (again after every measurement, so a run cut short by its time
    limit still leaves its table), plus cuda_select.json with --tune; copy to $OUT if set."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = info["stamp"]
    table = fmt_table(results)
    doc = {"info": info, "results": results, "budget_left_s": budget.left(), "complete": final}
    (out_dir / f"gpu_{stamp}.json").write_text(json.dumps(doc, indent=1))
    md = [f"# CUDA kernel benchmark {info['date']}{'' if final else ' (partial)'}", "",
          f"GPU {info['gpu']} ({info['capability']}), driver {info.get('driver', info.get('cuda_driver_api'))}, "
          f"torch {info['torch']}, NVRTC {info['nvrtc']}", "", table, ""]
    (out_dir / f"gpu_{stamp}.md").write_text("\n".join(md))
    if args.tune:
        rows = tune_rows(results, info["capability"])
        if rows:
            write_table(rows, str(out_dir / "cuda_select.json"), {"source": f"gpu_{stamp}.json", **info})
    dest = os.environ.get("OUT")
    if dest:
        for f in out_dir.glob(f"gpu_{stamp}.*"):
            shutil.copy(f, dest)
        if args.tune and (out_dir / "cuda_select.json").exists():
            shutil.copy(out_dir / "cuda_select.json", dest)
    if final:
        print(table)
        print(f"bench_cuda: wrote {out_dir}/gpu_{stamp}.json and .md")


def tune_rows(results: list, arch: str) -> list:
    """Fastest config per M bucket over the model shapes (majority vote of the shapes)."""
    from collections import Counter

    votes: dict[int, Counter] = {}
    for r in results:
        if r["kind"] == "linear" and r["label"] != "paper" and r.get("best_cfg"):
            votes.setdefault(r["M"], Counter())[tuple(r["best_cfg"])] += 1
    rows = []
    for m in sorted(votes):
        impl, tm, tn, wm, wn = votes[m].most_common(1)[0][0]
        rows.append({"arch": arch, "m_max": m, "impl": impl, "tile_m": tm, "tile_n": tn, "warps_m": wm, "warps_n": wn})
    # M above the largest measured bucket keeps the built-in guess (select_cuda appends them).
    return rows


if __name__ == "__main__":
    sys.exit(main())
