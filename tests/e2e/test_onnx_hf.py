"""Hugging Face BERT-, GPT- and LLaMA-style models (tiny configs) exported with the dynamo exporter
and imported back: outputs equal torch (and onnx.reference where it can run the file)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
transformers = pytest.importorskip("transformers")
import torch
from onnx.reference import ReferenceEvaluator

from bwta_compiler.onnx import import_model

pytestmark = pytest.mark.slow


def tiny(name: str) -> torch.nn.Module:
    t = transformers
    torch.manual_seed(0)
    if name == "gpt2":
        return t.GPT2Model(t.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                        bos_token_id=0, eos_token_id=0))
    if name == "bert":
        return t.BertModel(t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, vocab_size=100, max_position_embeddings=64))
    return t.LlamaModel(t.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                      max_position_embeddings=64))


class LastHidden(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_hf_model_roundtrip(name, tmp_path):
    model = LastHidden(tiny(name).eval()).eval()
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randint(0, 100, (2, 8)),), str(path), external_data=False, opset_version=18,
                          dynamic_shapes={"ids": {0: torch.export.Dim("b"), 1: torch.export.Dim("s")}})
    gm = import_model(path)
    for b, t in ((2, 8), (3, 5)):
        ids = torch.randint(0, 100, (b, t))
        with torch.no_grad():
            got, expected = gm(ids), model(ids)
        assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5
        if name != "bert":     # onnx.reference's GatherElements cannot run BERT's position-id lookup
            ref = ReferenceEvaluator(str(path)).run(None, {gm.onnx_input_names[0]: ids.numpy()})[0]
            assert float(np.abs(got.numpy() - ref).max() / np.abs(ref).max()) <= 1e-5
