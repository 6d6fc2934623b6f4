"""Reference low-bit MatMuls on packed codes equal an integer matmul of the unpacked codes."""

import pytest
import torch

import bwta_compiler  # noqa: F401
from bwta_compiler import formats, reference

bwta = torch.ops.bwta
KS = [1, 31, 32, 33, 64, 100, 4096]


def _int_mm(a, b):
    return (a.double() @ b.double().transpose(-1, -2)).long()


def _codes(kind, *shape):
    if kind == "ternary":
        return torch.randint(-1, 2, shape).float()
    if kind == "binary":
        return torch.where(torch.rand(*shape) < 0.5, 1.0, -1.0)
    return torch.randint(0, 2, shape).float()


_PACK = {"ternary": formats.pack_ternary_codes, "binary": formats.pack_binary_codes, "bool": formats.pack_bool_codes}
_CASES = {"bt": ("ternary", "binary", reference.acc_bt), "tt": ("ternary", "ternary", reference.acc_tt),
          "ut": ("bool", "ternary", reference.acc_ut), "bb": ("binary", "binary", None)}


@pytest.mark.parametrize("variant", list(_CASES))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m,n", [(1, 1), (3, 5), (17, 9)])
def test_accumulators_exact(variant, k, m, n):
    a_kind, b_kind, fn = _CASES[variant]
    a, b = _codes(a_kind, m, k), _codes(b_kind, n, k)
    ap, bp = _PACK[a_kind](a), _PACK[b_kind](b)
    acc = reference.acc_bb(ap, bp, k) if variant == "bb" else fn(ap, bp)
    assert torch.equal(acc, _int_mm(a, b))


@pytest.mark.parametrize("variant", list(_CASES))
def test_mm_ops_with_epilogue_and_batch(variant):
    a_kind, b_kind, _ = _CASES[variant]
    k = 100
    a, b = _codes(a_kind, 2, 3, 7, k), _codes(b_kind, 2, 3, 6, k)
    scale, bias = torch.rand(6) + 0.1, torch.randn(6)
    op = getattr(bwta, f"mm_{variant}")
    out = op(_PACK[a_kind](a), _PACK[b_kind](b), k, scale, bias, torch.float32)
    expect = _int_mm(a, b).float() * scale + bias
    assert torch.equal(out, expect)
    torch.library.opcheck(op, (_PACK[a_kind](a), _PACK[b_kind](b), k, scale, bias, torch.float16))


@pytest.mark.parametrize("pad", [64, 128])
def test_padding_does_not_change_results(pad):
    a, b = _codes("ternary", 4, 70), _codes("binary", 3, 70)
    ap, bp = formats.pack_ternary_codes(a, pad), formats.pack_binary_codes(b, pad)
    assert torch.equal(reference.acc_bt(ap, bp), _int_mm(a, b))
    assert torch.equal(reference.acc_bb(formats.pack_binary_codes(-b[:1].repeat(4, 1), pad), bp, 70), _int_mm(-b[:1].repeat(4, 1), b))


@pytest.mark.parametrize("act", ["ternary", "bool", "binary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_linear_matches_module_arithmetic(act, dtype):
    k, n = 75, 11
    x = torch.randn(2, 5, k, dtype=dtype).abs() if act == "bool" else torch.randn(2, 5, k, dtype=dtype)
    w = torch.randn(n, k)
    s, b = torch.tensor(0.8), torch.tensor(0.1)
    cw, alpha = bwta.binary_code(w)
    cx = {"ternary": lambda: bwta.ternary_code(x, s, 1), "bool": lambda: bwta.bool_code(x, s, b, 1),
          "binary": lambda: bwta.sign_code(x, s)}[act]()
    bias = torch.randn(n)
    expect = (torch.nn.functional.linear(cx.float(), cw.float()) * (alpha * s) + bias).to(dtype)
    got = bwta.linear(x, s, b if act == "bool" else None, act, formats.pack_binary_codes(cw), k,
                      alpha * s, bias, dtype)
    assert torch.equal(got, expect)


def test_fused_qbmm_tt_ut():
    q, kk, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    sq, sk, sv, sp, bp = (torch.tensor(x) for x in (0.7, 0.9, 0.6, 0.05, 0.01))
    scale = sq * sk * 0.25
    got = bwta.qbmm(q, "ternary", sq, None, kk, "ternary", sk, None, False, scale, None, None)
    cq, ck = bwta.ternary_code(q, sq, 1), bwta.ternary_code(kk, sk, 1)
    assert torch.equal(got, torch.matmul(cq, ck.transpose(-1, -2)) * scale)
    p = torch.softmax(got, -1)
    got2 = bwta.qbmm(p, "bool", sp, bp, v, "ternary", sv, None, True, sp * sv, None, None)
    expect2 = torch.matmul(bwta.bool_code(p, sp, bp, 1), bwta.ternary_code(v, sv, 1)) * (sp * sv)
    assert torch.equal(got2, expect2)


def test_bad_inputs():
    x = torch.randn(3, 64)
    wp = formats.pack_binary_codes(torch.ones(4, 64))
    s = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"input K=64 .* does not match the packed weight's K=100"):
        bwta.linear(x, s, None, "ternary", formats.pack_binary_codes(torch.ones(4, 100)), 100)
    with pytest.raises(TypeError, match="w_packed must be packed int32"):
        bwta.linear(x, s, None, "ternary", wp.float(), 64)
    with pytest.raises(ValueError, match="s must be finite"):
        bwta.linear(x, torch.tensor(float("nan")), None, "ternary", wp, 64)
    with pytest.raises(ValueError, match="unknown activation quantizer 'int4'"):
        bwta.linear(x, s, None, "int4", wp, 64)
    with pytest.raises(ValueError, match="packed K differs"):
        bwta.mm_bt(formats.pack_ternary_codes(torch.ones(2, 128)), wp, 64)
    with pytest.raises(ValueError, match=r"ternary words \[..., rows, 2, Kw\]"):
        bwta.mm_tt(wp, wp, 64)
    with pytest.raises(ValueError, match="contraction sizes differ"):
        bwta.qbmm(x, "ternary", s, None, torch.randn(3, 32), "ternary", s, None, False)
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        bwta.binary_code(torch.ones(3, 3, dtype=torch.int32))


@pytest.mark.parametrize("act", ["ternary", "bool", "binary"])
@pytest.mark.parametrize("k", [1, 33, 100, 257])
def test_unbound_fused_ops_equal_popcount_oracles(act, k):
    x = torch.randn(3, 4, k)
    x = x.abs() if act == "bool" else x
    s, b = torch.tensor(0.7), torch.tensor(0.05) if act == "bool" else None
    wp = formats.pack_binary_codes(torch.where(torch.rand(9, k) < 0.5, 1.0, -1.0))
    scale, bias = torch.rand(9) + 0.1, torch.randn(9)
    got = bwta.linear(x, s, b, act, wp, k, scale, bias, torch.float16)
    assert torch.equal(got, reference.linear_reference(x, s, b, act, wp, k, scale, bias, torch.float16, 64))
    y = torch.randn(3, k, 5)
    pairs = {"ternary": "ternary", "bool": "ternary", "binary": "binary"}
    got = bwta.qbmm(x, act, s, b, y, pairs[act], torch.tensor(0.9), None, True, torch.tensor(0.3), None, None)
    expect = reference.qbmm_reference(x, act, s, b, y, pairs[act], torch.tensor(0.9), None, True,
                                      torch.tensor(0.3), None, None, 64)
    assert torch.equal(got, expect)
