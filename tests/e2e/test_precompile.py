"""save_compiled / load_compiled: a bwta-compiled model written to a file and run from it in a fresh
process (no Dynamo tracing, no AOTAutograd, no passes there), equal to the eager quantized model;
files and calls it cannot serve warn and run the model without bwta."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import bwta_compiler as bc
from bwta_compiler.errors import UnsupportedError
from bwta_compiler.models import Encoder, EncoderConfig


def _frozen_encoder(cfg: EncoderConfig, ids: torch.Tensor, mask: torch.Tensor) -> nn.Module:
    q = bc.quantize(Encoder(cfg).eval()).eval()
    with torch.no_grad():
        q(ids, mask)                  # calibrate the activation scales
    return bc.freeze(q)


def _inputs(cfg: EncoderConfig, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(b, t)
    mask[0, t // 2:] = 0                 # padding in the first sequence
    return torch.randint(0, cfg.vocab_size, (b, t)), mask


@contextlib.contextmanager
def _kernel_lookups():
    """The names of the generated kernels the calls inside look up; a fallback to running without
    bwta (which warns) fails the test instead."""
    from bwta_compiler import kernel_registry

    looked_up: list[str] = []
    get = kernel_registry.get
    kernel_registry.get = lambda name: (looked_up.append(name), get(name))[1]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="bwta")
            yield looked_up
    finally:
        kernel_registry.get = get


# The fresh process: the model skeleton from the checkpoint, the compiled graph from the file.
_CHILD = textwrap.dedent("""
    import json, sys, warnings
    import torch, bwta_compiler as bc
    from bwta_compiler import kernel_registry
    from bwta_compiler.models import Encoder, EncoderConfig
    warnings.filterwarnings("error", message="bwta")   # a fallback to eager would warn: fail instead
    cfg = EncoderConfig.tiny()
    with torch.device("meta"):
        model = bc.freeze(bc.quantize(Encoder(cfg)).eval())
    model.load_state_dict(torch.load(sys.argv[1]), assign=True)
    fn = bc.load_compiled(model, sys.argv[2])
    looked_up = []
    get = kernel_registry.get
    kernel_registry.get = lambda name: (looked_up.append(name), get(name))[1]
    result = {"equal": [], "kernels": []}
    for path in sys.argv[3:]:
        ids, mask = torch.load(path)
        looked_up.clear()
        out = fn(ids, mask)
        with torch.no_grad():
            ref = model(ids, mask)
        result["equal"].append(bool(torch.equal(out, ref)))
        result["kernels"].append(len(looked_up))
    print("RESULT " + json.dumps(result))
""")


def test_saved_model_runs_its_kernels_in_a_fresh_process(tmp_path):
    cfg = EncoderConfig.tiny()
    ids, mask = _inputs(cfg, 2, 12)
    model = _frozen_encoder(cfg, ids, mask)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    bc.save_compiled(model, (ids, mask), tmp_path / "model.bwta")
    assert bc.last_report().lowbit == bc.last_report().total == 16
    calls = []
    for i, (b, t) in enumerate(((2, 12), (3, 29), (1, 5))):  # the saved size and others (dynamic)
        torch.save(_inputs(cfg, b, t), tmp_path / f"in{i}.pt")
        calls.append(str(tmp_path / f"in{i}.pt"))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "model.pt"), str(tmp_path / "model.bwta"),
                           *calls], capture_output=True, text=True, env=dict(os.environ), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["equal"] == [True, True, True]
    # 2 layers x (6 linears + 2 attention MatMuls): every one through a generated kernel
    assert result["kernels"] == [16, 16, 16]


def test_a_call_the_guards_reject_runs_the_model_without_bwta(tmp_path):
    cfg = EncoderConfig.tiny()
    ids, mask = _inputs(cfg, 2, 12)
    bc.save_compiled(_frozen_encoder(cfg, ids, mask), (ids, mask), tmp_path / "model.bwta")
    other_cfg = EncoderConfig.tiny(hidden=96, heads=3, intermediate=128)   # another model's shapes
    other = _frozen_encoder(other_cfg, ids, mask)
    fn = bc.load_compiled(other, tmp_path / "model.bwta")
    with pytest.warns(UserWarning, match="does not fit this call"):
        out = fn(ids, mask)
    with torch.no_grad():
        assert torch.equal(out, other(ids, mask))


def test_an_unreadable_file_warns_and_runs_the_model_without_bwta(tmp_path):
    cfg = EncoderConfig.tiny()
    ids, mask = _inputs(cfg, 2, 7)
    model = _frozen_encoder(cfg, ids, mask)
    bad = tmp_path / "broken.bwta"
    bad.write_bytes(os.urandom(256))
    with pytest.warns(UserWarning, match="broken.bwta"):
        fn = bc.load_compiled(model, bad)
    with torch.no_grad():
        assert torch.equal(fn(ids, mask), model(ids, mask))


class _GraphBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        if x.sum().item() > 0:          # data-dependent Python control flow: a graph break
            return self.lin(x)
        return -self.lin(x)


def test_a_forward_with_a_graph_break_is_refused_naming_the_model(tmp_path):
    x = torch.randn(3, 64)
    q = bc.quantize(_GraphBreak()).eval()
    with torch.no_grad():
        q(x)
    with pytest.raises(UnsupportedError, match="_GraphBreak"):
        bc.save_compiled(q, (x,), tmp_path / "m.bwta")
    assert not (tmp_path / "m.bwta").exists()


def test_a_forward_torch_cannot_save_is_refused_with_the_reason(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=128)
    q = bc.quantize(transformers.BertModel(cfg).eval()).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        q(input_ids=ids)
    # HF's forward reads objects by identity (ID_MATCH guards), which torch 2.13 cannot write.
    with pytest.raises(UnsupportedError, match="BertModel.*torch.compile"):
        bc.save_compiled(q, (), tmp_path / "bert.bwta", kwargs={"input_ids": ids})
    with torch.no_grad():   # the model is untouched: torch.compile with bwta still runs it
        c = torch.compile(q, backend="bwta", options={"fallback": "eager"})
        assert torch.equal(c(input_ids=ids).last_hidden_state, q(input_ids=ids).last_hidden_state)


def test_a_decoder_saved_with_prefill_and_decode_steps_serves_other_lengths(tmp_path):
    from bwta_compiler.models import Decoder, DecoderConfig

    cfg = DecoderConfig.tiny()
    q = bc.quantize(Decoder(cfg).eval()).eval()      # not frozen: weights packed at the first call
    prompt = torch.randint(0, cfg.vocab_size, (2, 7))
    step = torch.randint(0, cfg.vocab_size, (2, 1))
    with torch.no_grad():
        _, cache = q(prompt)
        _, cache2 = q(step, cache)
    # A step's cache has other strides than the prefill's: one more graph for it.
    bc.save_compiled(q, (prompt,), tmp_path / "dec.bwta", more_calls=[((step, cache), {}), ((step, cache2), {})])
    fn = bc.load_compiled(q, tmp_path / "dec.bwta")
    with torch.no_grad(), _kernel_lookups() as looked_up:
        ids = torch.randint(0, cfg.vocab_size, (2, 13))      # another prompt length
        out, c = fn(ids)
        ref, rc = q(ids)
        assert torch.equal(out, ref)
        for _ in range(3):
            tok = torch.randint(0, cfg.vocab_size, (2, 1))
            out, c = fn(tok, c)
            ref, rc = q(tok, rc)
            assert torch.equal(out, ref)
            assert all(torch.equal(a, b) for pa, pb in zip(c, rc) for a, b in zip(pa, pb))
    assert len(looked_up) >= 4 * 2 * 7      # 4 calls, each through 2 layers x 7 linear kernels at least


def test_a_model_built_under_inference_mode_saves_and_runs_its_kernels(tmp_path):
    from model_zoo import SDPABlock

    with torch.inference_mode():      # its parameters are inference tensors
        q = bc.quantize(SDPABlock(64, 4).eval()).eval()
        q(torch.randn(2, 9, 64))
    bc.save_compiled(q, (torch.randn(2, 9, 64),), tmp_path / "m.bwta")
    fn = bc.load_compiled(q, tmp_path / "m.bwta")
    x = torch.randn(3, 5, 64)
    with _kernel_lookups() as looked_up:
        out = fn(x)
    with torch.no_grad():
        assert torch.equal(out, q(x))
    assert len(looked_up) == 4        # fused QKV, Q·Kᵀ, P·V, output projection: all through kernels
