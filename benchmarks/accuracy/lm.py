"""A small LLaMA-style LM trained from scratch on Wikipedia + news text, then quantized to BWTA.

1. byte-level BPE trained offline with ``tokenizers`` on the training documents;
2. float pre-training of a tiny :class:`bwta_compiler.models.Decoder`;
3. BWTA variants initialised from the float model and distilled from it (logits + hidden + attention),
   all with the same step budget: SMQ (levelwise + projection), direct ternary, binary activations;
4. ablations (loss curves): levelwise vs bitwise degradation, projection vs None / Mean / Search;
   at every stage switch the distillation loss on a fixed held-out batch is measured just before and
   just after the switch (no optimiser step in between), and after 1/5/20 steps;
5. validation perplexity on held-out documents for every model.

Writes benchmarks/results/lm.json, lm_curves.png, lm_ablation_*.png.  ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from bwta_compiler import QuantConfig, quantize
from bwta_compiler.models import Decoder, DecoderConfig
from bwta_compiler.modules import BinaryActQuantizer, BWTAAttention
from bwta_compiler.smq import DistillConfig, SMQSchedule, SMQTrainer, TrainConfig


def build_corpus(vocab: int, max_docs: int, seed: int = 0):
    """Wikipedia summaries + news articles -> (tokenizer, train ids, val ids); 5% of documents held out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = common.wiki_texts() + common.news_texts()
    rng = random.Random(seed)
    rng.shuffle(docs)
    docs = docs[:max_docs]
    n_val = max(20, len(docs) // 20)
    val_docs, train_docs = docs[:n_val], docs[n_val:]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_docs, trainer)
    eos = tok.token_to_id("<eos>")

    def stream(ds):
        out = []
        for e in tok.encode_batch(ds):
            out.extend(e.ids)
            out.append(eos)
        return torch.tensor(out, dtype=torch.int32)

    return tok, stream(train_docs), stream(val_docs), len(train_docs), len(val_docs)


def window_batch(stream: torch.Tensor, step: int, bsz: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, len(stream) - seq - 1, (bsz,), generator=g)
    return torch.stack([stream[s:s + seq + 1] for s in start.tolist()]).long()


def lm_forward(model, batch):
    return model(batch[:, :-1])[0]


def lm_loss(logits, batch):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model, val: torch.Tensor, seq: int, max_tokens: int) -> float:
    """Non-overlapping windows over the held-out stream (the first ``max_tokens`` tokens)."""
    model.eval()
    n = min(len(val) - 1, max_tokens) // seq
    tot, cnt = 0.0, 0
    for k in range(0, n, 16):
        rows = [val[i * seq:i * seq + seq + 1].long() for i in range(k, min(n, k + 16))]
        b = torch.stack(rows)
        lg = lm_forward(model, b)
        tot += float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), b[:, 1:].reshape(-1), reduction="sum"))
        cnt += b[:, 1:].numel()
    return math.exp(tot / cnt)


def binary_activations(model):
    """Linear layers already use sign activations (QuantConfig(act="binary")); make attention Q/K/V sign too
    (the probabilities stay bool {0,1}, as in BiT)."""
    for m in model.modules():
        if isinstance(m, BWTAAttention):
            m.q_quant, m.k_quant, m.v_quant = BinaryActQuantizer(), BinaryActQuantizer(), BinaryActQuantizer()
    return model


def run_variant(name, teacher, schedule, switch, args, train, val, log, act="ternary", fixed=None):
    qs = args.seed if args.qat_seed is None else args.qat_seed
    torch.manual_seed(qs)
    student = quantize(teacher, QuantConfig(act=act, levels=schedule.stages[0].levels))
    if act == "binary":
        binary_activations(student)
    cfg = TrainConfig(lr=args.qat_lr, warmup=0.05, switch=switch, distill=DistillConfig(task=args.task_weight))
    tr = SMQTrainer(student, schedule, lm_forward, lm_loss, cfg, teacher=teacher)
    get = lambda s: window_batch(train, s, args.batch, args.seq, qs + 1)
    probes = []

    def probe_loss():
        student.eval()
        with torch.no_grad():
            return float(tr.compute_loss(fixed)["total"])

    t0 = time.time()
    pending = None
    while tr.step < schedule.total_steps:
        b = get(tr.step)
        if fixed is not None and schedule.stage_index(tr.step) != tr.stage_idx:
            before = probe_loss()
            tr._maybe_switch(b)
            pending = {"step": tr.step, "stage": tr.stage_idx, "before": before, "after": probe_loss(), "later": {}}
            probes.append(pending)
        tr.train_step(b)
        if pending is not None and tr.step - pending["step"] in (1, 5, 20):
            pending["later"][tr.step - pending["step"]] = probe_loss()
        if tr.step % max(1, schedule.total_steps // 10) == 0:
            log(f"  {name}: step {tr.step}/{schedule.total_steps} ({tr.history[-1]['levels']}L) "
                f"loss {tr.history[-1]['total']:.4f} [{time.time() - t0:.0f}s]")
    ppl = perplexity(student, val, args.seq, args.val_tokens)
    log(f"{name}: val ppl {ppl:.2f} ({time.time() - t0:.0f}s)")
    return {"name": name, "ppl": ppl, "schedule": schedule.describe(), "switch": switch, "act": act,
            "loss": [h["total"] for h in tr.history], "switch_probes": probes,
            "switch_factors": [{"step": s["step"], "p_mean": _mean([q.get("p") for q in s["quantizers"].values()])}
                               for s in tr.switches], "seconds": time.time() - t0}, student


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def smooth(xs, w):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot(res, path, names, title, boundaries):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n in names:
        r = res[n]
        ax.plot(smooth(r["loss"], 10), label=f"{n} (ppl {r['ppl']:.1f})", lw=1.2)
    for b, c in boundaries:
        for x in b:
            ax.axvline(x, color=c, lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss (10-step mean)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--docs", type=int, default=4000, help="documents used (wiki + news, shuffled)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--float-steps", type=int, default=1200)
    ap.add_argument("--qat-steps", type=int, default=560, help="steps per BWTA variant")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--qat-lr", type=float, default=5e-4)
    ap.add_argument("--task-weight", type=float, default=0.0, help="hard-label CE weight next to distillation")
    ap.add_argument("--val-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0, help="corpus split, float model and (default) QAT seed")
    ap.add_argument("--qat-seed", type=int, help="seed of the BWTA runs only (init order, data order)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="smq,direct,binary,none,mean,search,bitwise")
    ap.add_argument("--out", default="lm")
    args = ap.parse_args(argv)
    if args.quick:
        args.docs, args.float_steps, args.qat_steps, args.val_tokens = 2000, 150, 112, 8192
        args.vocab, args.hidden, args.layers = 1024, 64, 2
        args.out = args.out + "_quick"
    torch.set_num_threads(args.threads)
    log = common.Log(args.out)
    log(f"args: {vars(args)}")

    t0 = time.time()
    tok, train, val, n_tr, n_va = build_corpus(args.vocab, args.docs, args.seed)
    log(f"corpus: {n_tr} train docs ({len(train)} tokens), {n_va} val docs ({len(val)} tokens); "
        f"BPE vocab {tok.get_vocab_size()} [{time.time() - t0:.0f}s]")

    torch.manual_seed(args.seed)
    cfg = DecoderConfig(vocab_size=tok.get_vocab_size(), hidden=args.hidden, layers=args.layers, heads=args.heads,
                        kv_heads=args.heads, intermediate=int(args.hidden * 8 / 3) // 8 * 8,
                        max_positions=args.seq + 1)
    model = Decoder(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    fl = SMQTrainer(model, SMQSchedule.direct(args.float_steps), lm_forward, lm_loss,
                    TrainConfig(lr=args.lr, warmup=0.05, distill=None))
    t1 = time.time()
    key = (f"lm_v{args.vocab}_d{args.docs}_h{args.hidden}_l{args.layers}_a{args.heads}_t{args.seq}_b{args.batch}"
           f"_s{args.float_steps}_lr{args.lr}_seed{args.seed}")
    ck = common.CACHE / f"float_{key}.pt"
    if ck.exists():  # the float model is cached for reruns of the BWTA variants
        fl.load(str(ck))
        log(f"float: loaded cached model {ck}")
    else:
        fl.fit(lambda s: window_batch(train, s, args.batch, args.seq, args.seed),
               log=lambda m: log("  float " + m))
        common.CACHE.mkdir(parents=True, exist_ok=True)
        fl.save(str(ck))
    teacher = fl.model.eval()
    res = {"float": {"name": "float", "ppl": perplexity(teacher, val, args.seq, args.val_tokens),
                     "loss": [h["total"] for h in fl.history], "seconds": time.time() - t1}}
    log(f"float: {n_params} params, val ppl {res['float']['ppl']:.2f}")

    k = args.qat_steps
    pre, fin = k // 2 // 7, k - 7 * (k // 2 // 7)
    level = SMQSchedule.levelwise(pre, final_steps=fin)
    bit = SMQSchedule.bitwise(k // 2 // 2, final_steps=k - 2 * (k // 2 // 2))
    direct = SMQSchedule.direct(k)
    fixed = window_batch(val, 0, args.batch, args.seq, 12345)
    plan = {
        "smq": (level, "projection", "ternary"),
        "direct": (direct, "projection", "ternary"),
        "binary": (direct, "projection", "binary"),
        "none": (level, "none", "ternary"),
        "mean": (level, "mean", "ternary"),
        "search": (level, "search", "ternary"),
        "bitwise": (bit, "projection", "ternary"),
    }
    labels = {"smq": "BWTA+SMQ (levelwise, projection)", "direct": "BWTA direct (ternary)",
              "binary": "binary activations", "none": "levelwise, None", "mean": "levelwise, Mean",
              "search": "levelwise, Search", "bitwise": "bitwise (8->4->2 bit), projection"}
    for v in args.variants.split(","):
        sched, sw, act = plan[v]
        log(f"{v}: {labels[v]}; schedule {sched.describe()}")
        r, _ = run_variant(v, teacher, sched, sw, args, train, val, log, act=act, fixed=fixed)
        r["label"] = labels[v]
        res[v] = r
        out = {"experiment": "tiny LLaMA-style LM, Wikipedia + news", "machine": common.machine(), "args": vars(args),
               "model": {"config": cfg.__dict__, "params": n_params}, "corpus": {"train_docs": n_tr, "val_docs": n_va,
               "train_tokens": len(train), "val_tokens": len(val), "eval_tokens": min(len(val), args.val_tokens)},
               "results": res, "seconds": time.time() - t0}
        common.write_json(args.out, out)

    fp = res["float"]["ppl"]
    rows = [f"| {labels.get(n, n)} | {r['ppl']:.2f} | {100 * (r['ppl'] / fp - 1):+.1f}% |" for n, r in res.items()]
    log("\n| model | val PPL | vs float |\n|---|---|---|\n" + "\n".join(rows))
    R = common.RESULTS
    have = [n for n in ("smq", "direct", "binary") if n in res]
    if have:
        plot(res, R / f"{args.out}_curves.png", have, "BWTA LM: SMQ vs direct vs binary activations",
             [(level.boundaries[1:], "gray")])
    if "bitwise" in res and "smq" in res:
        plot(res, R / f"{args.out}_ablation_degradation.png", ["smq", "bitwise"], "levelwise vs bitwise degradation",
             [(level.boundaries[1:], "tab:blue"), (bit.boundaries[1:], "tab:orange")])
    inits = [n for n in ("smq", "none", "mean", "search") if n in res]
    if len(inits) > 1:
        plot(res, R / f"{args.out}_ablation_projection.png", inits, "scale re-initialisation at stage switches",
             [(level.boundaries[1:], "gray")])
    log(f"done in {time.time() - t0:.0f}s")
    return res


if __name__ == "__main__":
    main()
