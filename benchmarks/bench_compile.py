"""Compile time of the example BERT-base-sized encoder with ``backend="bwta"``, cold and warm.

Each measurement is a fresh process, timed from before its interpreter starts (``import torch``
included), the way a deployment restarts:

  prepare  (not timed) build the encoder, quantize, calibrate the activation scales, freeze it
           (packed weights only) and save the state dict — what training leaves behind;
  cold     empty bwta kernel cache and empty inductor cache: build the model skeleton on the meta
           device, load the frozen checkpoint, ``torch.compile(..., backend="bwta")``, first output;
  warm     the same again, with the caches the cold run filled;
  save     ``bc.save_compiled`` of the frozen encoder (once, after training; its time is the
           compile plus writing the file);
  load     ``bc.load_compiled`` from that file in a fresh process: no Dynamo tracing, AOTAutograd
           or passes; the float remainder runs eagerly;
  inductor-cold / inductor-warm (``--baseline``): the float encoder with ``backend="inductor"`` the
           same way, the time torch.compile itself needs for this model on this machine.

Prints the phases (import torch, model ready, first output) and the compile breakdown (Dynamo
tracing, AOTAutograd, bwta passes, kernel generation/compilation, fallback compiler), and writes
``benchmarks/results/compile_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _child(args: argparse.Namespace) -> None:
    t_start = float(os.environ["BWTA_BENCH_T0"])
    stamps: dict[str, float] = {}
    import torch

    stamps["import torch"] = time.time() - t_start
    if args.threads:
        torch.set_num_threads(args.threads)
    import bwta_compiler as bc
    from bwta_compiler.models import Encoder, EncoderConfig

    cfg = EncoderConfig.bert_base(layers=args.layers)
    if args.phase == "prepare":
        torch.manual_seed(0)
        float_model = Encoder(cfg).eval()
        torch.save(float_model.state_dict(), _float_ckpt(args))
        model = bc.quantize(float_model).eval()
        with torch.no_grad():
            model(*_inputs(torch, cfg, args))          # calibrate the activation scales
        torch.save(bc.freeze(model).state_dict(), args.ckpt)
        return
    if args.phase.startswith("inductor"):              # the baseline: the float model, inductor
        with torch.device("meta"):
            model = Encoder(cfg).eval()
        model.load_state_dict(torch.load(_float_ckpt(args)), assign=True)
        stamps["model ready"] = time.time() - t_start
        compiled = torch.compile(model, backend="inductor")
        with torch.no_grad():
            compiled(*_inputs(torch, cfg, args))
        stamps["first output"] = time.time() - t_start
        print("BENCH_JSON " + json.dumps({"stamps": stamps, "bwta": {}, "summary": "", "torch": _torch_times()}),
              flush=True)
        return
    with torch.device("meta"):                         # skeleton only: the checkpoint has the values
        model = bc.freeze(bc.quantize(Encoder(cfg)).eval())
    model.load_state_dict(torch.load(args.ckpt), assign=True)
    stamps["model ready"] = time.time() - t_start
    saved = str(Path(args.ckpt).with_name("encoder.bwta"))
    if args.phase == "save":                           # bc.save_compiled: once, after training
        bc.save_compiled(model, _inputs(torch, cfg, args), saved)
        stamps["first output"] = time.time() - t_start   # (here: the file written)
        print("BENCH_JSON " + json.dumps({"stamps": stamps, "bwta": {}, "summary": bc.last_report().summary(),
                                          "torch": _torch_times()}), flush=True)
        return
    if args.phase == "load":                           # a deployment restart from the saved file
        fn = bc.load_compiled(model, saved)
        stamps["file loaded"] = time.time() - t_start
        fn(*_inputs(torch, cfg, args))
        stamps["first output"] = time.time() - t_start
        print("BENCH_JSON " + json.dumps({"stamps": stamps, "bwta": {}, "summary": "", "torch": {}}), flush=True)
        return
    compiled = torch.compile(model, backend="bwta", options={"fallback": args.fallback})
    with torch.no_grad():
        compiled(*_inputs(torch, cfg, args))
    stamps["first output"] = time.time() - t_start
    rep = bc.last_report()
    bwta_s: dict[str, float] = {}
    for g in rep.graphs:
        for k, v in g.seconds.items():
            bwta_s[k] = bwta_s.get(k, 0.0) + v
    out = {"stamps": stamps, "bwta": bwta_s, "summary": rep.summary(), "torch": _torch_times()}
    print("BENCH_JSON " + json.dumps(out), flush=True)


def _torch_times() -> dict[str, float]:
    from torch._dynamo.utils import compilation_time_metrics as dyn

    pick = {"dynamo tracing": "bytecode_tracing", "aot + backend": "create_aot_dispatcher_function"}
    return {k: sum(dyn[v]) for k, v in pick.items() if dyn.get(v)}


def _float_ckpt(args: argparse.Namespace) -> str:
    return str(Path(args.ckpt).with_name("encoder_float.pt"))


def _inputs(torch, cfg, args):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    return ids, torch.ones(args.batch, args.seq)


def _run(phase: str, args: argparse.Namespace, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", "--phase", phase, "--ckpt", args.ckpt, "--layers", str(args.layers),
           "--batch", str(args.batch), "--seq", str(args.seq), "--fallback", args.fallback,
           "--threads", str(args.threads)]
    env = dict(env, BWTA_BENCH_T0=repr(time.time()))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)  # returncode read below
    if proc.returncode:
        raise RuntimeError(f"{phase} run failed:\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    return {}


def _fmt(name: str, r: dict) -> str:
    s = r["stamps"]
    parts = [f"{k} {v:.1f}" for k, v in r["torch"].items()] + [f"{k} {v:.1f}" for k, v in r["bwta"].items()]
    parts += [f"{k} at {v:.1f}" for k, v in s.items() if k not in ("import torch", "model ready", "first output")]
    return (f"{name:13s} import torch {s['import torch']:5.1f} s | model ready {s['model ready']:5.1f} s | "
            f"first output {s['first output']:5.1f} s (compile {s['first output'] - s['model ready']:.1f} s: "
            + ", ".join(parts) + ")")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="")
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--fallback", default="inductor", choices=["inductor", "eager"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--baseline", action="store_true",
                    help="also time the float encoder with backend='inductor', cold and warm (the floor torch sets)")
    ap.add_argument("--out", default=str(RESULTS / "compile_cpu.json"))
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    from bwta_compiler.runtime.compile_cpu import cpu_model

    with tempfile.TemporaryDirectory(prefix="bwta-compile-bench-") as tmp:
        args.ckpt = str(Path(tmp) / "encoder_frozen.pt")
        env = dict(os.environ, BWTA_CACHE_DIR=str(Path(tmp) / "bwta-cache"),
                   TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor-cache"))
        env.pop("BWTA_DEBUG", None)
        _run("prepare", args, env)
        phases = ("cold", "warm", "save", "load") + (("inductor-cold", "inductor-warm") if args.baseline else ())
        results = {name: _run(name, args, env) for name in phases}
    print(f"# {cpu_model()} | {os.cpu_count()} cores | encoder {args.layers} x 768, batch {args.batch}, "
          f"seq {args.seq} | fallback {args.fallback} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for name, r in results.items():
        print(_fmt(name, r))
    print(results["warm"].get("summary", ""))
    out = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg": os.getloadavg(),
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
           "config": {k: v for k, v in vars(args).items() if k not in ("child", "phase", "ckpt")}, **results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
