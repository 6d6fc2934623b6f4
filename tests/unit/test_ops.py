"""Quantizer and packing custom ops: opcheck, the code rules, straight-through gradients, errors."""

import math

import pytest
import torch

import bwta_compiler  # noqa: F401  (registers the ops)
from bwta_compiler import formats, ops

bwta = torch.ops.bwta


def _s(v=0.7):
    return torch.tensor(v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_quantizers(dtype):
    x = torch.randn(4, 37, dtype=dtype)
    torch.library.opcheck(bwta.ternary_code, (x, _s(), 1))
    torch.library.opcheck(bwta.ternary_code, (x, _s(), 3))
    torch.library.opcheck(bwta.bool_code, (x.abs(), _s(), torch.tensor(0.1), 1))
    torch.library.opcheck(bwta.sign_code, (x, _s()))
    torch.library.opcheck(bwta.binary_code, (torch.randn(6, 37, dtype=dtype),))


def test_opcheck_autograd():
    x = torch.randn(3, 17, requires_grad=True)
    s = torch.tensor(0.6, requires_grad=True)
    b = torch.tensor(0.05, requires_grad=True)
    torch.library.opcheck(bwta.ternary_code, (x, s, 1))
    torch.library.opcheck(bwta.bool_code, (x.detach().abs().requires_grad_(), s, b, 2))
    torch.library.opcheck(bwta.binary_code, (torch.randn(4, 9, requires_grad=True),))
    torch.library.opcheck(bwta.grad_scale, (s, 0.5))


def test_opcheck_packing():
    c = torch.randint(-1, 2, (5, 70)).float()
    torch.library.opcheck(bwta.pack_ternary, (c, 64))
    torch.library.opcheck(bwta.pack_binary, (torch.where(c >= 0, 1.0, -1.0), 64))
    torch.library.opcheck(bwta.pack_bool, (c.abs(), 128))
    torch.library.opcheck(bwta.unpack_binary, (formats.pack_binary_codes(torch.ones(5, 70)), 70, torch.float32))


@pytest.mark.parametrize("levels", [1, 2, 8])
def test_ternary_code_is_clamped_round(levels):
    s = torch.rand(()) + 0.2
    x = torch.randn(2000) * 3 * s
    u = x / s
    away_from_ties = (u - u.floor() - 0.5).abs() > 1e-3
    expect = torch.clamp(torch.round(u), -levels, levels)
    got = bwta.ternary_code(x, s, levels)
    assert torch.equal(got[away_from_ties], expect[away_from_ties])
    assert set(got.unique().tolist()) <= set(range(-levels, levels + 1))


def test_ternary_thresholds_strict_and_in_activation_dtype():
    s = torch.tensor(0.3)
    t = ops.ternary_thresholds(s, 1, torch.float16)[0]
    x = torch.stack([t, -t, torch.nextafter(t, torch.tensor(9.0, dtype=torch.float16))])
    assert bwta.ternary_code(x, s, 1).tolist() == [0.0, 0.0, 1.0]


def test_bool_code_rule():
    s, b = torch.tensor(0.2), torch.tensor(0.05)
    x = torch.rand(1000)
    assert torch.equal(bwta.bool_code(x, s, b, 1), (x > (b + 0.5 * s)).float())
    got = bwta.bool_code(x, s, b, 3)
    u = (x - b) / s
    ok = (u - u.floor() - 0.5).abs() > 1e-3
    assert torch.equal(got[ok], torch.clamp(torch.round(u), 0, 3)[ok])


def test_binary_code_and_alpha():
    w = torch.randn(8, 33)
    code, alpha = bwta.binary_code(w)
    d = w - w.mean(-1, keepdim=True)
    assert torch.equal(code, torch.where(d >= 0, 1.0, -1.0))
    torch.testing.assert_close(alpha, d.abs().mean(-1))
    torch.testing.assert_close(ops.binarize(w), code * alpha[:, None])


def test_straight_through_gradients():
    x = torch.tensor([-3.0, -0.4, 0.1, 0.9, 5.0], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    y = ops.ternarize(x, s)  # s * code
    y.sum().backward()
    # Inside |x/s| <= 1 the STE passes the gradient; outside it is clipped.
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # LSQ: d/ds = round(x/s) - x/s inside, +-m outside.
    expect = (-1) + (0 + 0.4) + (0 - 0.1) + (1 - 0.9) + 1
    assert math.isclose(float(s.grad), expect, rel_tol=1e-6)


def test_grad_scale_only_scales_gradient():
    s = torch.tensor(2.0, requires_grad=True)
    y = bwta.grad_scale(s, 0.25)
    assert float(y.detach()) == 2.0
    (3 * y).backward()
    assert float(s.grad) == 0.75


def test_bad_inputs_name_the_tensor():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x must be a floating tensor.*int64"):
        bwta.ternary_code(torch.ones(4, 8, dtype=torch.long), _s())
    with pytest.raises(ValueError, match="s must be finite"):
        bwta.ternary_code(x, torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="s must be finite and > 0"):
        bwta.ternary_code(x, torch.tensor(-1.0))
    with pytest.raises(ValueError, match=r"s must hold one value.*\(3,\)"):
        bwta.ternary_code(x, torch.ones(3))
    with pytest.raises(ValueError, match="levels"):
        bwta.ternary_code(x, _s(), 0)
    with pytest.raises(ValueError, match="b must be finite"):
        bwta.bool_code(x, _s(), torch.tensor(float("inf")))
