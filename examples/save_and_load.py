"""Compile a BWTA model once, save it, and serve it from the file in a new process.

    python examples/save_and_load.py save   # quantize, calibrate, freeze, compile, write two files
    python examples/save_and_load.py load   # a fresh process: skeleton + weights + compiled file

The second command does no Dynamo tracing, AOTAutograd or bwta passes: it reads the guards and
the compiled graph from ``encoder.bwta`` and runs the generated kernels (from the kernel cache).
"""

from __future__ import annotations

import sys
import time

T0 = time.time()

import torch

import bwta_compiler as bc
from bwta_compiler.models import Encoder, EncoderConfig

CFG = EncoderConfig.bert_base(layers=4)
WEIGHTS, COMPILED = "encoder_frozen.pt", "encoder.bwta"


def example_inputs(batch: int = 4, seq: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, CFG.vocab_size, (batch, seq)), torch.ones(batch, seq)


def save() -> None:
    model = bc.quantize(Encoder(CFG).eval()).eval()
    with torch.no_grad():
        model(*example_inputs())                 # calibrate the activation scales
    model = bc.freeze(model)                     # packed weights only
    torch.save(model.state_dict(), WEIGHTS)
    bc.save_compiled(model, example_inputs(), COMPILED)
    print(bc.last_report().summary(), f"-> {WEIGHTS}, {COMPILED}")


def load() -> None:
    with torch.device("meta"):                   # the skeleton; the checkpoint has the values
        model = bc.freeze(bc.quantize(Encoder(CFG)).eval())
    model.load_state_dict(torch.load(WEIGHTS), assign=True)
    run = bc.load_compiled(model, COMPILED)
    ids, mask = example_inputs(batch=2, seq=100)  # other sizes than the saved ones
    out = run(ids, mask)
    print(f"first output {time.time() - T0:.1f} s after process start")
    with torch.no_grad():
        print("equal to the eager model:", torch.equal(out, model(ids, mask)))


if __name__ == "__main__":
    {"save": save, "load": load}[sys.argv[1] if len(sys.argv) > 1 else "save"]()
