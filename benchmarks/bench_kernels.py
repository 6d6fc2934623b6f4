"""Kernel-level benchmark: bwta BT linear (activation quantize+pack + popcount GEMM + epilogue,
one generated CPU kernel) against torch's dense alternatives on this CPU.

Baselines, all measured in the same process as bwta (ratios are taken per run, not across runs):
  fp32  F.linear(x, W)                      (MKL / oneDNN sgemm)
  bf16  F.linear(x_bf16, W_bf16)            (oneDNN; AMX where the CPU has it)
  int8  torch._int_mm(x_codes, W_codes^T)   (oneDNN s8s8s32; exact for ternary x binary codes).
        Timed on codes quantized beforehand: the int8 path gets its activation quantization for free,
        while bwta's time includes quantize+pack, so the int8 ratio favours torch.
Each timing is the median of repeated calls after a warm-up; bwta and fp32 are called in
alternation (see ``paired_times``), so both sides of the headline ratio see the same machine state.  Writes
benchmarks/results/kernels_cpu.json and kernels_cpu.png and prints a table.

Usage: python benchmarks/bench_kernels.py [--quick] [--threads N] [--isa auto|avx2|portable|avx512]
                                         [--clock wall|cpu] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bwta_compiler.runtime import compile_cpu, cpu

from bwta_compiler import config, formats, reference
from bwta_compiler.select_cpu import cpu_params
from timing import alternating_medians

SHAPES = [(768, 768), (768, 3072), (3072, 768), (4096, 4096), (4096, 11008), (11008, 4096)]
MS = [1, 16, 128, 512, 2048]
QUICK_SHAPES = [(768, 768), (4096, 4096)]
QUICK_MS = [1, 16, 128]
RESULTS = Path(__file__).parent / "results"
# torch._int_mm without VNNI/AMX and bf16 without native bf16 (e.g. AVX2-only CPUs) run for seconds
# per call at large M: once a call is predicted (linear in M, from the previous M) to take longer than
# this, the baseline is not run; the JSON keeps null plus "<name>_predicted", and a predicted time
# that is the best exact baseline is marked as such ("best_exact": "int8 (predicted)").
MAX_S = {"bf16": 8.0, "int8": 4.0}
# The timer: wall clock (default), or with --clock cpu the calling thread's CPU time.  CPU time is
# only meaningful with one thread (then torch, MKL/oneDNN and the kernel all run in the calling
# thread); it leaves out the time a shared machine preempts the process, so it measures the code.
CLOCK: list[Callable[[], float]] = [time.perf_counter]

# Popcount peak in bit-MACs per cycle per core, by ISA path:
#  avx512: VPOPCNTQ zmm issues once per cycle -> 512 bits/cycle.
#  avx2:   no vector popcount; the nibble-LUT count needs 2 VPSHUFB per 256 bits and Zen3 / Intel
#          big cores have 2 shuffle ports -> 256 bits/cycle.  (The whole inner loop is 9 vector ops
#          per 256-bit word pair on 4 ALU pipes, so ~114 bits/cycle is the practical ceiling.)
#  portable: scalar POPCNT, 64 bits each, ~3-4 per cycle on current cores -> 192 bits/cycle.
POPC_PEAK = {"avx512": 512, "avx2": 256, "portable": 192}


def median_time(fn: Callable[[], object], min_reps: int = 5, budget_s: float = 1.5, max_reps: int = 51,
                slow_s: float = 2.0) -> float:
    """Median seconds per call: one warm-up, then at least ``min_reps`` calls within ``budget_s``.
    A call slower than ``slow_s`` (bf16 / int8 without native support at large M) is timed 3 times."""
    clock = CLOCK[0]
    t0 = clock()
    fn()
    if clock() - t0 > slow_s:
        min_reps, budget_s = 3, 0.0
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def paired_times(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median seconds per call, the functions timed in alternation in blocks of three calls with
    the first of each block dropped (operands warm; :func:`cold_time` measures the cold case)."""
    return alternating_medians(fns, min_rounds=5, max_rounds=51, budget_s=3.0, block=3, clock=CLOCK[0])


_FLUSH: list[torch.Tensor] = []


def cold_time(fn: Callable[[], object], reps: int = 15) -> float:
    """Median seconds per call with the last-level cache flushed before each call (a 96 MB write):
    a decode step of a model too big for the cache streams every layer's weights from DRAM."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(24 << 20, dtype=torch.float32))
    clock = CLOCK[0]
    fn()
    times = []
    for _ in range(reps):
        _FLUSH[0].fill_(1.0)
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def machine() -> dict:
    model = compile_cpu.cpu_model()
    mhz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "mhz": mhz,
            "isa": compile_cpu.detect_isa(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "compiler": compile_cpu.compiler_version(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_avg_at_start": os.getloadavg()}


def bench_shape(k: int, n: int, ms: list[int], cfg: config.Config) -> list[dict]:
    """All M for one K x N: bwta kernel (built once) and the three torch baselines."""
    w = torch.randn(n, k)
    w_codes = torch.where(w >= 0, 1.0, -1.0)
    w_packed = formats.pack_binary_codes(w_codes)
    w_bf16, w_i8t = w.to(torch.bfloat16), w_codes.to(torch.int8).t().contiguous()  # [K, N]
    kern = cpu.load_kernel(cpu_params("bt", "ternary", "binary", n, k, 128, "float32", "float32", cfg), cfg)
    scale, s = torch.rand(n) + 0.5, torch.tensor(0.5)
    rows = []
    last: dict[str, tuple[int, float]] = {}  # (M, seconds) of the last run, to predict very slow baselines
    for m in ms:
        x = torch.randn(m, k)
        if m <= 16:  # a correctness spot check on the exact shape benchmarked
            want = reference.linear_reference(x, s, None, "ternary", w_packed, k, scale, None, None, 64)
            assert torch.equal(kern(x, s, None, w_packed, scale, None, None), want), f"bwta != reference at {k}x{n}"
        x_bf16 = x.to(torch.bfloat16)
        x_i8 = torch.clamp(torch.round(x / 0.5), -1, 1).to(torch.int8)
        # bwta and fp32 (the headline ratio) alternate call by call; bf16 / int8 are 17-1000x
        # slower than bwta here, far outside what load noise could change, and run on their own.
        t: dict[str, float | None] = dict(paired_times(
            {"bwta": lambda: kern(x, s, None, w_packed, scale, None, None), "fp32": lambda: F.linear(x, w)}))
        if m == 1:  # decode: also with every weight streamed from DRAM (both sides)
            t["bwta_cold"] = cold_time(lambda: kern(x, s, None, w_packed, scale, None, None))
            t["fp32_cold"] = cold_time(lambda: F.linear(x, w))
        for name, fn in (("bf16", lambda: F.linear(x_bf16, w_bf16)), ("int8", lambda: _int8(x_i8, w_i8t))):
            if name in last and last[name][0] >= 16 and last[name][1] / last[name][0] * m > MAX_S[name]:
                # Skipped: predicted linearly in M from the last measured M >= 16 (these baselines are
                # already linear in M there: int8 without VNNI took ~96 ms per row at both M = 1 and 16).
                t[name], t[name + "_predicted"] = None, last[name][1] / last[name][0] * m
                continue
            t[name] = median_time(fn)
            last[name] = (m, t[name])
        rows.append(_row(k, n, m, t, kern.params.isa))
        print(_fmt(rows[-1]), flush=True)
    return rows


def _int8(x_i8: torch.Tensor, w_i8t: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(x_i8, w_i8t)


def _row(k: int, n: int, m: int, t: dict, isa: str) -> dict:
    candidates = {key.replace("_predicted", " (predicted)"): v for key, v in t.items()
                  if key in ("bf16", "int8", "bf16_predicted", "int8_predicted") and v is not None}
    best_name = min(candidates, key=candidates.get)
    best_exact = candidates[best_name]
    ghz = max(machine_mhz(), 1.0) / 1000
    bit_macs = m * n * k / t["bwta"]
    peak = POPC_PEAK[isa] * ghz * 1e9 * torch.get_num_threads()
    return {"K": k, "N": n, "M": m, "ms": {key: (v * 1e3 if v else None) for key, v in t.items()},
            "x_fp32": t["fp32"] / t["bwta"], "x_bf16": (t["bf16"] / t["bwta"]) if t["bf16"] else None,
            "x_int8": (t["int8"] / t["bwta"]) if t["int8"] else None, "x_best_exact": best_exact / t["bwta"],
            "x_fp32_cold": (t["fp32_cold"] / t["bwta_cold"]) if t.get("bwta_cold") else None,
            "best_exact": best_name,
            "gmac_s": bit_macs / 1e9, "popc_peak_frac": bit_macs / peak}


_MHZ: list[float] = []


def machine_mhz() -> float:
    if not _MHZ:
        _MHZ.append(machine()["mhz"])
    return _MHZ[0]


def _ms(ms: dict, name: str) -> str:
    if ms.get(name):
        return f"{ms[name]:9.3f}"
    return f"~{ms[name + '_predicted']:8.0f}" if ms.get(name + "_predicted") else "      n/a"


def _x(v: float | None) -> str:
    return f"{v:6.1f}" if v else "   n/a"


def _fmt(r: dict) -> str:
    ms = r["ms"]
    return (f"{r['K']:5d}x{r['N']:<5d} M={r['M']:4d} | bwta {ms['bwta']:9.3f} fp32 {ms['fp32']:9.3f} "
            f"bf16 {_ms(ms, 'bf16')} int8 {_ms(ms, 'int8')} ms | x fp32 {r['x_fp32']:6.1f} bf16 {_x(r['x_bf16'])} "
            f"int8 {_x(r['x_int8'])} best-exact {r['x_best_exact']:6.1f}{'~' if 'pred' in r['best_exact'] else ' '}| "
            f"{r['gmac_s']:6.1f} GMAC/s "
            f"{100 * r['popc_peak_frac']:4.1f}% peak"
            + (f" | weights from DRAM: bwta {ms['bwta_cold']:.3f} fp32 {ms['fp32_cold']:.3f} ms x fp32 "
               f"{r['x_fp32_cold']:.1f}" if r.get("x_fp32_cold") else ""))


# Attention MatMuls: (label, batch*heads, query rows M, keys S, head dim D).  Decode rows use the
# kernels a KV-cache decode step binds: Q.K^T the packed TT kernel (static D), P.V the qbmm_rows
# kernel (run-time key length); the BERT-base prefill rows use the packed TT / UT kernels.
ATTENTION = [("decode, 32 heads x 128", 32, 1, 512, 128), ("decode, 32 heads x 128", 32, 1, 2048, 128),
             ("BERT-base prefill, batch 8", 96, 128, 128, 64)]


def _attention_kernel(cfg: config.Config, variant: str, d_or_k: int, m: int, rows: bool):
    from bwta_compiler.kernels import GemmParams
    from bwta_compiler.select_cpu import select_cpu_params

    a_act = "bool" if variant == "ut" else "ternary"
    if rows:
        base = GemmParams(variant=variant, a_act=a_act, b_act="ternary", k=0, kw=0, n=d_or_k, has_scale=True,
                          scale_per_col=False, b_kn=True, op="qbmm_rows")
        return cpu.load_kernel(select_cpu_params(base, cfg), cfg)
    return cpu.load_kernel(cpu_params(variant, a_act, "ternary", 0, d_or_k, m, "float32", "float32", cfg,
                                      b_kn=True, op="qbmm", scale_per_col=False), cfg)


def bench_attention(cfg: config.Config) -> list[dict]:
    """Q.K^T and P.V as bwta runs them (quantization of both operands included) against fp32 matmul
    on the float operands, and against the exact reference path (float GEMM on codes) for P.V."""
    out = []
    for label, nb, m, s, d in ATTENTION:
        decode = m == 1
        q, k = torch.randn(nb, m, d), torch.randn(nb, s, d)
        p, v = torch.softmax(torch.randn(nb, m, s) * 2, -1), torch.randn(nb, s, d)
        kt = k.transpose(-1, -2)                                     # [.., D, S]: how the graph passes K^T
        t_s, p_s, p_b, scale = torch.tensor(0.5), torch.tensor(1.0 / s), torch.tensor(0.0), torch.tensor([0.1])
        qk = _attention_kernel(cfg, "tt", d, m, rows=False)
        pv = _attention_kernel(cfg, "ut", d if decode else s, m, rows=decode)
        ref_pv = lambda: reference.qbmm_reference(p, "bool", p_s, p_b, v, "ternary", t_s, None, True, scale, None,
                                                  None, 64)
        assert torch.equal(pv(p, p_s, p_b, v, t_s, None, scale, None, None), ref_pv()), f"P.V != reference ({label})"
        t = paired_times({"qk_bwta": lambda: qk(q, t_s, None, kt, t_s, None, scale, None, None),
                          "qk_fp32": lambda: torch.matmul(q, kt),
                          "pv_bwta": lambda: pv(p, p_s, p_b, v, t_s, None, scale, None, None),
                          "pv_fp32": lambda: torch.matmul(p, v)})
        row = {"shape": label, "batch_heads": nb, "M": m, "S": s, "D": d, "pv_kernel": pv.params.op,
               "ms": {key: val * 1e3 for key, val in t.items()},
               "x_fp32_qk": t["qk_fp32"] / t["qk_bwta"], "x_fp32_pv": t["pv_fp32"] / t["pv_bwta"]}
        print(f"attention {label:28s} M={m:4d} S={s:5d} D={d:4d} | Q.K^T bwta {row['ms']['qk_bwta']:8.3f} "
              f"fp32 {row['ms']['qk_fp32']:8.3f} ms (x{row['x_fp32_qk']:.2f}) | P.V bwta ({pv.params.op}) "
              f"{row['ms']['pv_bwta']:8.3f} fp32 {row['ms']['pv_fp32']:8.3f} ms (x{row['x_fp32_pv']:.2f})", flush=True)
        out.append(row)
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (k, n) in sorted({(r["K"], r["N"]) for r in rows}):
        sel = [r for r in rows if (r["K"], r["N"]) == (k, n)]
        ms = [r["M"] for r in sel]
        axes[0].plot(ms, [r["x_fp32"] for r in sel], marker="o", label=f"{k}x{n}")
        axes[1].plot(ms, [r["x_best_exact"] for r in sel], marker="o", label=f"{k}x{n}")
    for ax, ylabel in zip(axes, ["speedup over fp32 F.linear", "speedup over best of bf16 / int8"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(1.5, color="red", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, three M values (smoke test)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--isa", default="auto", choices=["auto", "avx512", "avx2", "portable"])
    ap.add_argument("--out", default=str(RESULTS / "kernels_cpu"), help="output path without extension")
    ap.add_argument("--only-k", type=int, default=0, help="only the K x N shapes with this K (0 = all)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall clock, or CPU time of the calling thread (implies --threads 1)")
    args = ap.parse_args()
    if args.clock == "cpu":
        CLOCK[0], args.threads = time.thread_time, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config.resolve({"cpu_isa": args.isa})
    info = machine()
    info["clock"] = args.clock
    print(f"# {info['cpu']} | {info['cores']} cores, {info['threads']} threads | isa {info['isa']} | "
          f"torch {info['torch']} ({info['torch_cpu_capability']}) | {info['date']} | {args.clock} clock | "
          f"load {tuple(round(v, 1) for v in info['load_avg_at_start'])}")
    rows: list[dict] = []
    for k, n in (QUICK_SHAPES if args.quick else SHAPES):
        if args.only_k and k != args.only_k:
            continue
        rows += bench_shape(k, n, QUICK_MS if args.quick else MS, cfg)
    attention = [] if args.quick else bench_attention(cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info["load_avg_at_end"] = os.getloadavg()
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows, "attention": attention}, indent=1))
    plot(rows, out.with_suffix(".png"), f"bwta BT linear (incl. quantize+pack) | {info['cpu']} | "
         f"{info['threads']} threads, {args.clock} clock | {info['date']}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
