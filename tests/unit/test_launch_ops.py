"""The launch twins of the fused ops (bwta::linear_launch / qbmm_launch): same results as the
fused ops with the same bound kernel, scale checks kept, and the backend retargets bound nodes."""

from __future__ import annotations

import pytest
import torch
from bwta_compiler.runtime import cpu

import bwta_compiler as bc
from bwta_compiler import config, formats, kernel_registry, launch_ops, reference
from bwta_compiler.models import Encoder, EncoderConfig
from bwta_compiler.select_cpu import cpu_params

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs a C compiler")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> config.Config:
    return config.resolve({"cache_dir": str(tmp_path_factory.mktemp("launch-cache"))})


def _linear_kernel(cfg, n: int, k: int):
    kern = cpu.load_kernel(cpu_params("bt", "ternary", "binary", n, k, 16, "float32", "float32", cfg,
                                      has_bias=True), cfg)
    kernel_registry.register(kern.name, kern)
    return kern


def test_linear_launch_equals_fused_op(cfg) -> None:
    kern = _linear_kernel(cfg, 37, 130)
    x, s = torch.randn(3, 5, 130), torch.tensor(0.6)
    w, scale, bias = formats.pack_binary_codes(torch.randn(37, 130)), torch.rand(37) + 0.5, torch.randn(37)
    args = (x, s, None, "ternary", w, 130, scale, bias, None, 64, kern.name)
    got = torch.ops.bwta.linear_launch(*args)
    assert torch.equal(got, torch.ops.bwta.linear(*args))
    assert torch.equal(got, reference.linear_reference(x, s, None, "ternary", w, 130, scale, bias, None, 64))


def test_qbmm_launch_equals_fused_op(cfg) -> None:
    kern = cpu.load_kernel(cpu_params("tt", "ternary", "ternary", 0, 72, 16, "float32", "float32", cfg,
                                      has_scale=True, scale_per_col=False, op="qbmm"), cfg)
    kernel_registry.register(kern.name, kern)
    a, b = torch.randn(2, 3, 9, 72), torch.randn(2, 3, 11, 72)
    sa, sb, scale = torch.tensor(0.7), torch.tensor(0.4), torch.tensor([0.125])
    args = (a, "ternary", sa, None, b, "ternary", sb, None, False, scale, None, None, 64, kern.name)
    got = torch.ops.bwta.qbmm_launch(*args)
    assert got.shape == (2, 3, 9, 11)
    assert torch.equal(got, torch.ops.bwta.qbmm(*args))


def test_launch_checks_scales_and_rechecks_after_writes(cfg) -> None:
    kern = _linear_kernel(cfg, 8, 64)
    x, w = torch.randn(2, 64), formats.pack_binary_codes(torch.randn(8, 64))
    scale, bias = torch.rand(8), torch.randn(8)
    s = torch.tensor(0.5)
    torch.ops.bwta.linear_launch(x, s, None, "ternary", w, 64, scale, bias, None, 64, kern.name)
    s.fill_(-1.0)                  # written after its first check: checked again
    with pytest.raises(ValueError, match=r"bwta::linear: s must be finite and > 0"):
        torch.ops.bwta.linear_launch(x, s, None, "ternary", w, 64, scale, bias, None, 64, kern.name)
    with pytest.raises(ValueError, match="must be finite"):
        torch.ops.bwta.linear_launch(x, torch.tensor(float("nan")), None, "ternary", w, 64, scale, bias, None, 64,
                                     kern.name)


def test_launch_fake_shapes_follow_the_fused_ops() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(4, 7, 96), torch.empty(10, 2, dtype=torch.int32)
        y = torch.ops.bwta.linear_launch(x, torch.empty(()), None, "ternary", w, 96, None, None, torch.float16)
        assert y.shape == (4, 7, 10) and y.dtype == torch.float16
        a, b = torch.empty(2, 5, 64), torch.empty(2, 64, 9)
        z = torch.ops.bwta.qbmm_launch(a, "bool", torch.empty(()), torch.empty(()), b, "ternary", torch.empty(()),
                                       None, True)
        assert z.shape == (2, 5, 9)


def test_backend_binds_kernels_through_the_launch_ops(tmp_path) -> None:
    torch.manual_seed(0)
    m = bc.quantize(Encoder(EncoderConfig.tiny(layers=1))).eval()
    ids = torch.randint(0, 1000, (2, 6))
    with torch.no_grad():
        want = m(ids)
        got = torch.compile(m, backend="bwta", options={"fallback": "eager", "debug_dir": str(tmp_path)})(ids)
    torch.testing.assert_close(got, want)
    bound = next(tmp_path.rglob("*_bound_kernels.py")).read_text()
    assert "bwta.linear_launch.default" in bound and "bwta.qbmm_launch.default" in bound
    assert "bwta.linear.default" not in bound
    assert set(launch_ops.LAUNCH) == {torch.ops.bwta.linear.default, torch.ops.bwta.qbmm.default}


def test_launch_ops_pass_opcheck(cfg) -> None:
    # Schema, fake tensor and AOT dispatch checks of the launch twins (as for every bwta:: op).
    kern = _linear_kernel(cfg, 24, 100)
    x, s = torch.randn(5, 100), torch.tensor(0.5)
    w, scale, bias = formats.pack_binary_codes(torch.randn(24, 100)), torch.rand(24), torch.randn(24)
    torch.library.opcheck(torch.ops.bwta.linear_launch.default,
                          (x, s, None, "ternary", w, 100, scale, bias, None, 64, kern.name),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
