"""End-to-end benchmark: the example BERT-base-sized encoder and a LLaMA-7B-shaped decoder.

Compares, in one process (median of repeated runs after warm-up):
  eager fp32 (float model) | torch.compile inductor fp32 | inductor bf16 | bwta (BWTA model).
Encoder: 12 layers, hidden 768, sequence 128, batch 8 -> sequences/s.
Decoder: LLaMA-7B layer shapes (hidden 4096, FFN 11008, 32 heads), a few layers -> prefill and
decode (KV cache) tokens/s.

Writes benchmarks/results/e2e_cpu.json and e2e_cpu.png and prints the machine it ran on.
``--quick`` runs tiny shapes (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from bwta_compiler.runtime import compile_cpu
from timing import alternating_medians

import bwta_compiler as bc
from bwta_compiler.models import Decoder, DecoderConfig, Encoder, EncoderConfig

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = compile_cpu.cpu_model()
    if cpu == "unknown":
        cpu = platform.processor() or "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def median_s(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call (one function, no alternation)."""
    return alternating_medians({"fn": fn}, min_rounds=reps, max_rounds=reps)["fn"]


def _compile_time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_encoder(cfg: EncoderConfig, batch: int, seq: int, reps: int) -> dict:
    torch.manual_seed(0)
    float_model = Encoder(cfg).eval()
    bwta_model = bc.quantize(float_model).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, seq)
    out: dict = {"shape": f"{cfg.layers} layers, hidden {cfg.hidden}, batch {batch}, seq {seq}"}
    with torch.no_grad():
        bwta_model(ids, mask)
        variants = {
            "eager_fp32": lambda: float_model(ids, mask),
            "inductor_fp32": torch.compile(float_model, backend="inductor"),
            "bwta": torch.compile(bwta_model, backend="bwta"),
        }
        bf16 = Encoder(cfg).eval().to(torch.bfloat16)
        bf16.load_state_dict(float_model.state_dict())
        variants["inductor_bf16"] = torch.compile(bf16.to(torch.bfloat16), backend="inductor")
        # The same quantized model from a bc.save_compiled file (its float remainder runs eagerly).
        frozen = bc.freeze(copy.deepcopy(bwta_model))
        with tempfile.TemporaryDirectory() as tmp:
            bc.save_compiled(frozen, (ids, mask), Path(tmp) / "encoder.bwta")
            variants["bwta_saved"] = bc.load_compiled(frozen, Path(tmp) / "encoder.bwta")
        calls = {name: ((lambda f=fn: f(ids, mask)) if name != "eager_fp32" else fn) for name, fn in variants.items()}
        firsts = {name: _compile_time(call) for name, call in calls.items()}
        # All variants timed in alternation (one call each per round), so a slow minute on a
        # shared machine hits every variant alike instead of one.
        secs = alternating_medians(calls, min_rounds=reps, max_rounds=reps)
        for name, sec in secs.items():
            out[name] = {"ms": sec * 1e3, "seq_per_s": batch / sec, "first_call_s": firsts[name]}
            print(f"  encoder {name:14s} {sec * 1e3:9.1f} ms  ({batch / sec:7.1f} seq/s, first call {firsts[name]:.1f} s)")
    base = out["eager_fp32"]["ms"]
    for name in variants:
        out[name]["speedup_vs_eager_fp32"] = base / out[name]["ms"]
    return out


def bench_decoder(cfg: DecoderConfig, prompt: int, new_tokens: int, reps: int, context: int = 2048) -> dict:
    torch.manual_seed(0)
    float_model = Decoder(cfg).eval()
    bwta_model = bc.quantize(float_model).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt))
    out: dict = {"shape": f"{cfg.layers} LLaMA-7B-shaped layers, prompt {prompt}, {new_tokens} decode steps"}
    # One decode step at a long context: a synthetic KV cache of `context` positions per layer
    # (attention then reads 2 x context x kv_heads x head_dim values per layer and token), shared by all variants.
    g = torch.Generator().manual_seed(2)
    hd, context = cfg.hidden // cfg.heads, min(context, cfg.max_positions - 1)
    long_cache = [(torch.randn(1, cfg.kv_heads, context, hd, generator=g),
                   torch.randn(1, cfg.kv_heads, context, hd, generator=g)) for _ in range(cfg.layers)]
    tok = ids[:, -1:]
    with torch.no_grad():
        bwta_model(ids)
        variants = {"eager_fp32": float_model, "inductor_fp32": torch.compile(float_model, backend="inductor"),
                    "bwta": torch.compile(bwta_model, backend="bwta")}
        for name, model in variants.items():
            def prefill(m=model):
                return m(ids)

            def decode(m=model):
                logits, cache = m(ids)
                for _ in range(new_tokens):
                    logits, cache = m(logits[:, -1:].argmax(-1), cache)

            first = _compile_time(decode)
            pre = median_s(prefill, reps)
            total = median_s(decode, max(1, reps // 2))
            dec = max(total - pre, 1e-9) / new_tokens
            step = median_s(lambda m=model: m(tok, long_cache), max(3, reps))
            out[name] = {"prefill_tok_per_s": prompt / pre, "decode_tok_per_s": 1 / dec, "first_call_s": first,
                         f"decode_ctx{context}_tok_per_s": 1 / step}
            print(f"  decoder {name:14s} prefill {prompt / pre:8.1f} tok/s   decode {1 / dec:7.2f} tok/s   "
                  f"decode at context {context} {1 / step:7.2f} tok/s", flush=True)
        # The float lm_head (4096 x 32000 fp32, 0.5 GB read per token; bwta leaves it float as
        # BitNet-style models do) dominates a decode step of a 2-layer model and hides what the
        # layers cost: the same step once more with the head removed, every variant compiled anew.
        cache = float_model(ids)[1]
        for name in variants:
            # A fresh Dynamo cache each time: the variants share Decoder.forward's code object, and
            # its recompile limit (8 entries) would otherwise send a late variant to eager.
            torch._dynamo.reset()
            body = _headless(float_model if name != "bwta" else bwta_model)
            body = body if name == "eager_fp32" else torch.compile(body, backend="inductor" if name != "bwta" else "bwta")
            body(tok, cache)
            step = median_s(lambda m=body: m(tok, cache), max(3, reps))
            out[name]["decode_layers_only_tok_per_s"] = 1 / step
            print(f"  decoder {name:14s} decode step without the lm_head {1 / step:7.2f} tok/s "
                  f"({step * 1e3 / cfg.layers:.2f} ms per layer)", flush=True)
    for key in ("prefill_tok_per_s", "decode_tok_per_s", f"decode_ctx{context}_tok_per_s",
                "decode_layers_only_tok_per_s"):
        base = out["eager_fp32"][key]
        for name in variants:
            out[name][key.replace("tok_per_s", "speedup")] = out[name][key] / base
    return out


def _headless(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose lm_head is the identity (its output is the final hidden state)."""
    body = copy.deepcopy(model)
    body.lm_head = torch.nn.Identity()
    return body


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    enc = results["encoder"]
    names = [n for n in ("eager_fp32", "inductor_fp32", "inductor_bf16", "bwta", "bwta_saved") if n in enc]
    axes[0].bar(names, [enc[n]["speedup_vs_eager_fp32"] for n in names])
    axes[0].set_title("encoder speedup vs eager fp32")
    dec = results["decoder"]
    names = [n for n in ("eager_fp32", "inductor_fp32", "bwta") if n in dec]
    axes[1].bar(names, [dec[n]["prefill_tok_per_s"] for n in names])
    axes[1].set_title("decoder prefill tokens/s")
    axes[2].bar(names, [dec[n]["decode_tok_per_s"] for n in names])
    axes[2].set_title("decoder decode tokens/s")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the script")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decoder-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's); one thread "
                    "gives steadier ratios on a shared machine")
    ap.add_argument("--only", choices=["encoder", "decoder"], help="run one model (results go to e2e_cpu_<model>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        enc_cfg, batch, seq = EncoderConfig.tiny(), 2, 16
        dec_cfg, prompt, steps, context = DecoderConfig.tiny(), 8, 4, 64
    else:
        enc_cfg, batch, seq = EncoderConfig.bert_base(), 8, 128
        dec_cfg, prompt, steps, context = DecoderConfig.llama_7b(layers=args.decoder_layers, vocab_size=32000), 128, 16, 2048
    results = {"date": str(date.today()), "machine": machine(), "quick": args.quick}
    print(f"machine: {results['machine']}")
    results["threads"] = torch.get_num_threads()
    if args.only != "decoder":
        results["encoder"] = bench_encoder(enc_cfg, batch, seq, args.reps)
    if args.only != "encoder":
        results["decoder"] = bench_decoder(dec_cfg, prompt, steps, args.reps, context)
    RESULTS.mkdir(exist_ok=True)
    stem = (("e2e_cpu_quick" if args.quick else "e2e_cpu") + (f"_{args.only}" if args.only else "")
            + (f"_{args.threads}t" if args.threads else ""))
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    if not args.only:
        plot(results, RESULTS / f"{stem}.png")
    if "encoder" in results:
        e = results["encoder"]
        print(f"encoder: bwta {e['bwta']['speedup_vs_eager_fp32']:.2f}x eager fp32, "
              f"{e['inductor_fp32']['ms'] / e['bwta']['ms']:.2f}x inductor fp32, "
              f"{e['inductor_bf16']['ms'] / e['bwta']['ms']:.2f}x inductor bf16; from a saved file "
              f"{e['bwta_saved']['speedup_vs_eager_fp32']:.2f}x eager fp32")
    print(f"wrote {RESULTS / (stem + '.json')}" + ("" if args.only else " and .png"))


if __name__ == "__main__":
    main()
