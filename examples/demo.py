"""The main job, end to end: quantize the example BERT-style encoder with BWTA, report per layer
kind how far the BWTA model is from the float one and how much weight memory packing saves, then
compile it with ``torch.compile(backend="bwta")``, check it against eager and time it.

Run with ``make demo``.
"""

from __future__ import annotations

import copy
import os
import re
import statistics
import tempfile
import time
from collections import defaultdict

import torch

import bwta_compiler as bc
from bwta_compiler import formats
from bwta_compiler.models import Encoder, EncoderConfig


def layer_kind(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "", name)


def capture_linear_outputs(model: torch.nn.Module, *inputs) -> dict[str, torch.Tensor]:
    """Outputs of every linear layer (float or BWTA), by qualified name."""
    outs, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, bc.BWTALinear)):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: outs.__setitem__(n, o.detach())))
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return outs


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(float bytes, packed bytes) of the weights of the BWTA linear layers."""
    fp, packed = 0, 0
    for mod in model.modules():
        if isinstance(mod, bc.BWTALinear):
            n, k = mod.weight.shape
            fp += mod.weight.numel() * mod.weight.element_size()
            packed += n * formats.num_words(k) * 4 + n * 4    # int32 words + fp32 alpha
    return fp, packed


def median_ms(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=30522, hidden=768, layers=4, heads=12, intermediate=3072)
    print(f"Example encoder: {cfg.layers} layers, hidden {cfg.hidden}, heads {cfg.heads}, FFN {cfg.intermediate}")
    float_model = Encoder(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 128))
    mask = torch.ones(8, 128)
    mask[1, 100:] = 0
    model = bc.quantize(float_model).eval()
    with torch.no_grad():
        model(ids, mask)                     # calibrate the activation scales (LSQ init)
    for line in bc.report_lines(model):
        print(line)

    # ---- error of the BWTA layers against the float layers, per layer kind ----
    ref, got = capture_linear_outputs(float_model, ids, mask), capture_linear_outputs(model, ids, mask)
    errs = defaultdict(list)
    for name in ref:
        errs[layer_kind(name)].append(float((got[name] - ref[name]).norm() / ref[name].norm()))
    print("\nRelative output error of BWTA vs float, per linear layer kind (mean over layers):")
    for kind, vals in errs.items():
        print(f"  {kind:28s} {statistics.mean(vals):.3f}")
    with torch.no_grad():
        y_f, y_q = float_model(ids, mask), model(ids, mask)
    print(f"  {'whole encoder output':28s} {float((y_q - y_f).norm() / y_f.norm()):.3f}")
    fp, packed = weight_bytes(model)
    print(f"\nWeight memory of the BWTA layers: float {fp / 2**20:.1f} MiB -> packed {packed / 2**20:.2f} MiB "
          f"({fp / packed:.1f}x smaller)")

    frozen = bc.freeze(copy.deepcopy(model))
    print(f"State dict: float model {bc.state_dict_bytes(float_model) / 2**20:.1f} MiB, "
          f"frozen BWTA model (packed weights only) {bc.state_dict_bytes(frozen) / 2**20:.1f} MiB "
          f"(embeddings stay float)")
    compile_and_compare(float_model, model, ids, mask)


def compile_and_compare(float_model: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor,
                        mask: torch.Tensor) -> None:
    if "bwta" not in torch._dynamo.list_backends():
        print("\n(the bwta torch.compile backend is not installed; skipping the compiled run)")
        return
    dump = os.environ.get("BWTA_DEBUG_DIR") or tempfile.mkdtemp(prefix="bwta-demo-")
    compiled = torch.compile(model, backend="bwta", options={"debug_dir": dump})
    t0 = time.perf_counter()
    with torch.no_grad():
        y_c = compiled(ids, mask)
    print(f"\ncompiled with backend='bwta' in {time.perf_counter() - t0:.1f} s (first call)")
    report = bc.last_report()
    print(report.summary())
    with torch.no_grad():
        y_e = model(ids, mask)
        rel = float((y_c - y_e).norm() / y_e.norm())
        float_ms = median_ms(lambda: float_model(ids, mask))
        comp_ms = median_ms(lambda: compiled(ids, mask))
    print(f"compiled vs eager BWTA model: relative error {rel:.2e} "
          f"({'bitwise equal' if torch.equal(y_c, y_e) else 'float ops outside bwta fused by inductor'})")
    print(f"eager fp32 float model {float_ms:.1f} ms, bwta-compiled BWTA model {comp_ms:.1f} ms per batch "
          f"-> {float_ms / comp_ms:.2f}x speedup over eager fp32")
    print(f"debug dump (graphs, kernel table, kernel sources): {dump}")


if __name__ == "__main__":
    main()
