"""Decoding with a growing KV cache: once Dynamo makes the key length dynamic, P.V runs the CPU
``qbmm_rows`` kernel (run-time key length) instead of the reference op, and stays bit-exact."""

import pytest
import torch
from bwta_compiler.runtime import compile_cpu

import bwta_compiler as bc
from bwta_compiler.models import Decoder, DecoderConfig

pytestmark = pytest.mark.skipif(not compile_cpu.available(), reason="needs a C compiler")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_bind_rows_kernel_and_match_eager(dtype, tmp_path):
    torch.manual_seed(3)
    cfg = DecoderConfig.tiny()                      # GQA: 4 query heads, 2 KV heads
    m = bc.quantize(Decoder(cfg)).eval().to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        m(ids)                                      # calibrate
        c = torch.compile(m, backend="bwta", options={"fallback": "eager", "cache_dir": str(tmp_path)})
        logits, cache = c(ids)
        ref_logits, ref_cache = m(ids)
        assert torch.equal(logits, ref_logits)
        for _ in range(4):                          # key length 10, 11, 12, 13: dynamic after the first
            nxt = logits[:, -1:].argmax(-1)
            logits, cache = c(nxt, cache)
            ref_logits, ref_cache = m(nxt, ref_cache)
            assert torch.equal(logits, ref_logits)
    rep = bc.last_report()
    kernels = [(choice, name) for g in rep.graphs for _, choice, name in g.kernels]
    rows = [name for choice, name in kernels if "qbmm_rows" in choice]
    assert rows and all(name for name in rows), kernels      # chosen and bound (not the reference op)
    assert not any("dynamic contraction length" in choice for choice, _ in kernels)
