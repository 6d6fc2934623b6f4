"""Markdown results table (benchmarks/results/accuracy<suffix>.md) from the experiments' JSON files,
with the paper's claims checked against the measured numbers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

LABELS = {"float": "float (fine-tuned)", "smq": "BWTA + SMQ (levelwise, projection)",
          "direct": "BWTA direct (ternary)", "binary": "binary activations", "noproj": "BWTA + SMQ without projection"}


def _load(name):
    p = common.RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _yn(b):
    return "holds" if b else "does NOT hold"


def classification_section(r, title="") -> list[str]:
    a, s = r["args"], r["sizes"]
    out = [(f"### MiniLM on {r['task']}{title} ({s['train']} train / {s['test']} test examples, "
            f"majority {100 * s['majority']:.1f}%)"),
           "",
           (f"Run size: max_len {a['max_len']}, batch {a['batch']}, float fine-tuning {a['float_steps']} steps, "
            f"{a['qat_steps']} QAT steps per BWTA variant (batch {a.get('qat_batch') or a['batch']}, "
            f"peak LR {a.get('qat_lr', '?')}), seeds {a['seeds']}; machine {r['machine'].get('cpu', '')}, "
            f"{r['machine'].get('threads')} thread(s), {r['machine']['date']}, "
            f"commit {r['machine'].get('commit', '?')}; {r.get('seconds', 0) / 60:.0f} min."), "",
           "| model | test accuracy % (mean ± std) | 95% bootstrap CI (seed 0) | drop vs float (points) |",
           "|---|---|---|---|"]
    summ = r.get("summary") or {}
    if not summ:  # partial run (stopped before its summary): summarise the seeds that finished
        out[2] += " Partial run: stopped before every seed finished; n says how many seeds each variant has."
        for v, runs in r["runs"].items():
            m, sd = common.mean_std([x["acc"] for x in runs])
            summ[v] = {"label": LABELS.get(v, v), "acc_mean": m, "acc_std": sd, "seeds": len(runs),
                       "ci95_seed0": runs[0]["ci95"], "drop_vs_float": r["runs"]["float"][0]["acc"] - m}
    for v, x in summ.items():
        per = ", ".join(f"{100 * y['acc']:.2f}" for y in r["runs"][v])
        out.append(f"| {x['label']} | {100 * x['acc_mean']:.2f} ± {100 * x['acc_std']:.2f} (n={x['seeds']}: {per}) | "
                   f"[{100 * x['ci95_seed0'][0]:.1f}, {100 * x['ci95_seed0'][1]:.1f}] | {100 * x['drop_vs_float']:+.2f} |")
    out.append("")
    out.append("Mean ± sample standard deviation over QAT seeds (the seed sets the QAT data order; the float model "
               "is shared); the bootstrap interval is over test examples, for the first seed's model.")
    out.append("")
    def sig(a, b):
        (l1, h1), (l2, h2) = summ[a]["ci95_seed0"], summ[b]["ci95_seed0"]
        return "" if h1 < l2 or h2 < l1 else " — not significant: the 95% intervals overlap"

    def paired(a, b):  # per-seed comparison where both variants ran the same seeds
        sa = {x["seed"]: x["acc"] for x in r["runs"].get(a, [])}
        sb = {x["seed"]: x["acc"] for x in r["runs"].get(b, [])}
        common_seeds = sorted(set(sa) & set(sb))
        if len(common_seeds) < 2:
            return ""
        wins = sum(sa[k] > sb[k] for k in common_seeds)
        return f"; {a} ahead in {wins} of {len(common_seeds)} seeds"

    if all(k in summ for k in ("smq", "direct")):
        f = summ["float"]["acc_mean"]
        sm, di = summ["smq"]["acc_mean"], summ["direct"]["acc_mean"]
        out.append(f"- SMQ closer to float than direct: {_yn(sm > di)} ({100 * sm:.2f} vs {100 * di:.2f}"
                   f"{sig('smq', 'direct')}{paired('smq', 'direct')}).")
        if "binary" in summ:
            bi = summ["binary"]["acc_mean"]
            out.append(f"- SMQ and direct both far above binary activations: {_yn(min(sm, di) > bi)} "
                       f"(binary {100 * bi:.2f}{sig('smq', 'binary')}).")
        out.append(f"- Goal, SMQ within 3.5 points of float: {_yn(f - sm <= 0.035)} ({100 * (f - sm):.2f} points).")
    if "noproj" in summ and "smq" in summ:
        out.append(f"- Projection factor helps (SMQ vs SMQ without projection): "
                   f"{_yn(summ['smq']['acc_mean'] > summ['noproj']['acc_mean'])} "
                   f"({100 * summ['smq']['acc_mean']:.2f} vs {100 * summ['noproj']['acc_mean']:.2f}"
                   f"{sig('smq', 'noproj')}{paired('smq', 'noproj')}).")
    out += loss_diagnostic(r)
    cc = r.get("compiled_check")
    if cc:
        out.append(f"- Compiled (`backend=\"bwta\"`) vs eager on the test set: {json.dumps(cc)}")
    out.append("")
    return out


def _final_stage_start(schedule: str) -> int:
    """Step at which the last stage of a ``"17L x7 -> ... -> 3L x49"`` schedule starts."""
    steps = [int(part.rsplit("x", 1)[1]) for part in schedule.split(" -> ")]
    return sum(steps[:-1])


def loss_diagnostic(r) -> list[str]:
    """Distillation loss (training batches, mean over seeds) of SMQ and direct around the step where SMQ's
    final (ternary) stage starts: is SMQ's multi-level warm-up ahead of direct when it reaches ternary?"""
    runs = r["runs"]
    if not all(k in runs for k in ("smq", "direct")):
        return []
    b = _final_stage_start(runs["smq"][0]["schedule"])
    if b <= 5:
        return []

    def window(v, lo, hi):
        vals = [sum(x["loss"][lo:hi]) / len(x["loss"][lo:hi]) for x in runs[v] if len(x["loss"]) >= hi]
        return sum(vals) / len(vals) if vals else float("nan")

    n = len(runs["smq"][0]["loss"])
    rows = [("smq", "BWTA + SMQ"), ("direct", "BWTA direct")] + ([("noproj", "SMQ without projection")]
                                                                   if "noproj" in runs else [])
    out = ["", f"Distillation loss on the training batches (mean over seeds) around step {b}, where SMQ's final "
           f"ternary stage starts (SMQ trains at 17..5 levels before it; direct is at ternary throughout):", "",
           f"| variant | steps {b - 5}-{b - 1} | steps {b}-{b + 4} (SMQ now ternary) | last 10 steps |",
           "|---|---|---|---|"]
    for v, lab in rows:
        out.append(f"| {lab} | {window(v, b - 5, b):.3f} | {window(v, b, b + 5):.3f} | {window(v, n - 10, n):.3f} |")
    out.append("")
    return out


def _probe_stats(res):
    pr = res.get("switch_probes") or []
    if not pr:
        return None
    jump = [p["after"] / p["before"] for p in pr]
    later = {k: [p["later"].get(str(k), p["later"].get(k)) for p in pr] for k in (1, 5, 20)}
    rec = {k: sum(v for v in vs if v is not None) / max(1, sum(v is not None for v in vs)) for k, vs in later.items()}
    return {"n": len(pr), "mean_jump": sum(jump) / len(jump), "max_jump": max(jump),
            "after": sum(p["after"] for p in pr) / len(pr), "later": rec}


def lm_section(r, title="") -> list[str]:
    a, m, c = r["args"], r["model"], r["corpus"]
    res = r["results"]
    fp = res["float"]["ppl"]
    out = [f"### Tiny LLaMA-style LM, Wikipedia + news (trained from scratch){title}", "",
           (f"Run size: {m['params']:,} parameters (hidden {a['hidden']}, {a['layers']} layers, vocab {a['vocab']}), "
            f"seq {a['seq']}, batch {a['batch']}, {c['train_tokens']:,} training tokens from {c['train_docs']} "
            f"documents, validation on the first {c['eval_tokens']:,} tokens of {c['val_docs']} held-out documents; "
            f"float {a['float_steps']} steps, {a['qat_steps']} distillation steps per BWTA variant (from the float "
            f"model); seed {a['seed']}; {r['machine'].get('cpu', '')}, {r['machine']['date']}, "
            f"{r.get('seconds', 0) / 60:.0f} min."), "",
           "| model | schedule | val PPL | vs float | final train loss (50-step mean) |", "|---|---|---|---|---|"]
    for n, x in res.items():
        fl = x["loss"][-50:]
        out.append(f"| {x.get('label', n)} | {x.get('schedule', 'float')} | {x['ppl']:.2f} | "
                   f"{100 * (x['ppl'] / fp - 1):+.1f}% | {sum(fl) / len(fl):.4f} |")
    out.append("")
    st = {n: _probe_stats(x) for n, x in res.items() if n != "float"}
    st = {n: s for n, s in st.items() if s}
    if st:
        out += [("Stage switches, distillation loss on a fixed held-out batch (mean over the switches): ratio "
                 "after/before the switch, and the loss right after it and 1 / 5 / 20 training steps later."), "",
                "| variant | switches | mean jump after/before | max jump | loss after | +1 step | +5 | +20 |",
                "|---|---|---|---|---|---|---|---|"]
        for n, s in st.items():
            out.append(f"| {res[n].get('label', n)} | {s['n']} | {s['mean_jump']:.3f} | {s['max_jump']:.3f} | "
                       f"{s['after']:.3f} | {s['later'][1]:.3f} | {s['later'][5]:.3f} | {s['later'][20]:.3f} |")
        out.append("")
    if all(k in res for k in ("smq", "direct")):
        sm, di = res["smq"]["ppl"], res["direct"]["ppl"]
        out.append(f"- SMQ closer to float than direct: {_yn(sm < di)} (PPL {sm:.2f} vs {di:.2f}; one seed).")
        if "binary" in res:
            bi = res["binary"]["ppl"]
            out.append(f"- both far better than binary activations: {_yn(max(sm, di) < bi)} (binary {bi:.2f}).")
        out.append(f"- Goal, SMQ PPL within 15% of float: {_yn(sm <= 1.15 * fp)} ({100 * (sm / fp - 1):+.1f}%).")
    if "smq" in st and "bitwise" in st:
        out.append(f"- Levelwise recovers faster than bitwise at switches: "
                   f"{_yn(st['smq']['max_jump'] < st['bitwise']['max_jump'])} (largest jump "
                   f"{st['smq']['max_jump']:.3f} vs {st['bitwise']['max_jump']:.3f}); final PPL "
                   f"{res['smq']['ppl']:.2f} vs {res['bitwise']['ppl']:.2f}.")
    inits = [n for n in ("smq", "none", "mean", "search") if n in st]
    if len(inits) > 1 and "smq" in inits:
        # Loss levels before a switch differ between variants, so "closest start" compares the jump ratio.
        best_start = min(inits, key=lambda n: st[n]["mean_jump"])
        best_end = min(inits, key=lambda n: res[n]["ppl"])
        out.append(f"- Projection starts closest (smallest mean loss jump at switches): {_yn(best_start == 'smq')} "
                   f"(lowest: {res[best_start].get('label', best_start)}); converges best (lowest final PPL): "
                   f"{_yn(best_end == 'smq')} (lowest: {res[best_end].get('label', best_end)}).")
    out.append("")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--suffix", default="")
    args = ap.parse_args(argv)
    lines = ["## Accuracy (SMQ training, real weights and text, CPU)", ""]
    # Main classification runs first, then the earlier, smaller single-seed runs (kept, labelled as such).
    cls = {"rt": "", "20ng": "",
           "rt_short": " — EARLIER small-budget run (32 QAT steps, one seed)",
           "rt_long": " — EARLIER run, larger QAT budget, SMQ and direct only (one seed)"}
    for t, title in cls.items():
        r = _load(f"classify_{t}{args.suffix}")
        if r:
            lines += classification_section(r, title)
    titles = {"lm": " — EARLIER run (280 distillation steps), not rerun on 2026-11-29 08:00-09:15",
              "lm_long": " — EARLIER run, larger QAT budget (840 steps), SMQ and direct only",
              "lm_qatseed1": " — EARLIER run, second QAT seed (280 steps)",
              "lm_long_qatseed1": " — 840 steps, second QAT seed (run 2026-11-29 09:13 UTC, 1 thread, 5 min)"}
    for t, title in titles.items():
        r = _load(f"{t}{args.suffix}")
        extra = _load(f"{t}_ablation{args.suffix}")  # variants run separately with the same float model
        if r and extra:
            r["results"].update({k: v for k, v in extra["results"].items() if k != "float"})
            r["seconds"] = r.get("seconds", 0) + extra.get("seconds", 0)
        if r:
            lines += lm_section(r, title)
    notes = common.RESULTS / f"accuracy_notes{args.suffix}.md"  # hand-written analysis of these runs, if any
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    p = common.RESULTS / f"accuracy{args.suffix}.md"
    p.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
