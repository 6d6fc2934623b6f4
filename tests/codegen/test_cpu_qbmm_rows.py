"""The qbmm_rows CPU kernel (attention P.V with a run-time key length) against the popcount
oracle ``reference.qbmm_reference``, bit for bit, on fresh random inputs and odd shapes."""

from __future__ import annotations

import pytest
import torch
from bwta_compiler.runtime import compile_cpu, cpu

from bwta_compiler import config, reference
from bwta_compiler.kernels import GemmParams
from bwta_compiler.select_cpu import select_cpu_params

pytestmark = pytest.mark.skipif(not compile_cpu.available(), reason="needs a C compiler")
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> config.Config:
    return config.resolve({"cache_dir": str(tmp_path_factory.mktemp("rows-cache"))})


def _kernel(cfg, a_act: str, n: int, in_dtype: str, out_dtype: str, has_bias: bool = False, b_dtype: str = ""):
    base = GemmParams(b_dtype=b_dtype, variant="ut" if a_act == "bool" else "tt", a_act=a_act, b_act="ternary", k=0, kw=0, n=n,
                      has_scale=True, scale_per_col=False, has_bias=has_bias, in_dtype=in_dtype,
                      out_dtype=out_dtype, b_kn=True, op="qbmm_rows")
    return cpu.load_kernel(select_cpu_params(base, cfg), cfg)


@pytest.mark.parametrize("a_act,in_dtype,b_dtype,out_dtype,batch,m,k,n", [
    ("bool", "float32", "", "float32", (2, 3), 1, 129, 64),       # decode: one query, odd key count
    ("bool", "float32", "", "float32", (1,), 7, 1, 33),           # a single key
    ("bool", "bfloat16", "", "bfloat16", (4,), 3, 300, 128),
    ("bool", "float16", "", "float32", (2,), 5, 77, 100),
    ("ternary", "float32", "", "float16", (3,), 2, 65, 24),
    ("bool", "float32", "bfloat16", "bfloat16", (2,), 1, 70, 64),  # fp32 softmax x bf16 V
    ("bool", "float32", "float16", "float32", (3,), 4, 31, 16),
])
def test_rows_kernel_equals_reference(cfg, a_act, in_dtype, b_dtype, out_dtype, batch, m, k, n):
    torch.manual_seed(1000 + k)
    kern = _kernel(cfg, a_act, n, in_dtype, out_dtype, b_dtype=b_dtype)
    dt, bdt = DT[in_dtype], DT[b_dtype or in_dtype]
    if a_act == "bool":
        a = torch.softmax(torch.randn(*batch, m, k) * 3, -1).to(dt)
        a_s, a_b = torch.tensor(0.5 / k), torch.tensor(0.0)
    else:
        a, a_s, a_b = torch.randn(*batch, m, k).to(dt), torch.tensor(0.6), None
    b = (torch.randn(*batch, k, n) * 1.3).to(bdt)
    b_s, scale = torch.tensor(0.7), torch.rand(1) + 0.5
    # Exact threshold ties (a strict > must stay strict) on both operands.
    b.view(-1)[::5] = torch.tensor([0.35, -0.35, 0.0], dtype=bdt).repeat(b.numel())[: b.view(-1)[::5].numel()]
    t_a = float(a_s / 2 + (a_b if a_b is not None else 0))
    a.view(-1)[::7] = t_a
    got = kern(a, a_s, a_b, b, b_s, None, scale, None, DT[out_dtype])
    want = reference.qbmm_reference(a, a_act, a_s, a_b, b, "ternary", b_s, None, True, scale, None, DT[out_dtype], 64)
    assert torch.equal(got, want)
    assert (got != 0).any()  # not vacuous: some rows of V were selected


def test_rows_kernel_broadcast_and_strided_b(cfg):
    """B broadcast over a batch dim (GQA-style) and B given transposed (N not contiguous)."""
    torch.manual_seed(7)
    kern = _kernel(cfg, "bool", 40, "float32", "float32", has_bias=True)
    a = torch.rand(2, 4, 3, 50)
    b = torch.randn(2, 1, 40, 50).transpose(-1, -2)            # [2, 1, K=50, N=40], N stride != 1
    a_s, a_b, b_s = torch.tensor(0.4), torch.tensor(0.1), torch.tensor(0.5)
    scale, bias = torch.tensor([0.25]), torch.randn(40)
    got = kern(a, a_s, a_b, b, b_s, None, scale, bias, None)
    want = reference.qbmm_reference(a, "bool", a_s, a_b, b, "ternary", b_s, None, True, scale, bias, None, 64)
    assert got.shape == (2, 4, 3, 40) and torch.equal(got, want)


def test_rows_kernel_rejects_bad_shapes(cfg):
    kern = _kernel(cfg, "bool", 16, "float32", "float32")
    a, b = torch.rand(2, 1, 10), torch.randn(2, 11, 16)
    with pytest.raises(ValueError, match="do not match"):
        kern(a, torch.tensor(0.1), torch.tensor(0.0), b, torch.tensor(0.5), None, torch.tensor([1.0]), None, None)
    with pytest.raises(ValueError, match="qbmm_rows"):
        cpu.make_source(select_cpu_params(GemmParams(variant="ut", a_act="bool", b_act="ternary", k=0, kw=0, n=0,
                                                     b_kn=True, op="qbmm_rows"), cfg))
