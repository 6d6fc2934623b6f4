"""Bit formats: pack -> unpack identity, LSB-first order, padding, and the 64-bit view."""

import pytest
import torch

from bwta_compiler import formats

KS = [1, 31, 32, 33, 64, 100, 4096]


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("rows", [(1,), (5,), (2, 3)])
def test_roundtrip_all_formats(k, rows):
    tern = torch.randint(-1, 2, (*rows, k)).float()
    binary = torch.where(torch.rand(*rows, k) < 0.5, 1.0, -1.0)
    boolc = torch.randint(0, 2, (*rows, k)).float()
    pt = formats.pack_ternary_codes(tern)
    pb = formats.pack_binary_codes(binary)
    pu = formats.pack_bool_codes(boolc)
    kw = formats.num_words(k)
    assert pt.shape == (*rows, 2, kw) and pt.dtype == torch.int32
    assert pb.shape == (*rows, kw) and pu.shape == (*rows, kw)
    assert torch.equal(formats.unpack_ternary_codes(pt, k), tern)
    assert torch.equal(formats.unpack_binary_codes(pb, k), binary)
    assert torch.equal(formats.unpack_bool_codes(pu, k), boolc)


def test_lsb_first_and_sign_bit():
    bits = torch.zeros(1, 64, dtype=torch.bool)
    bits[0, 0] = True      # element 0 -> bit 0 of word 0
    bits[0, 31] = True     # element 31 -> bit 31 of word 0 (the int32 sign bit)
    bits[0, 33] = True     # element 33 -> bit 1 of word 1
    w = formats.pack_bits(bits)
    assert w.tolist() == [[1 - 2**31, 2]]


def test_two_words_are_one_little_endian_uint64():
    bits = torch.rand(3, 128) < 0.5
    w32 = formats.pack_bits(bits)
    w64 = w32.contiguous().view(torch.int64)  # the CPU kernels' view of the same bytes
    for r in range(3):
        for j in range(2):
            val = int(w64[r, j]) & (2**64 - 1)
            expect = sum(1 << i for i in range(64) if bits[r, 64 * j + i])
            assert val == expect


@pytest.mark.parametrize("k,pad", [(1, 64), (65, 64), (100, 128), (33, 32)])
def test_padding_bits_are_zero(k, pad):
    bits = torch.ones(2, k, dtype=torch.bool)
    w = formats.pack_bits(bits, pad)
    assert w.shape[-1] * 32 == formats.padded_k(k, pad)
    assert int(formats.popcount32(w).sum()) == 2 * k


def test_popcount_matches_python():
    words = torch.randint(-2**31, 2**31 - 1, (1000,), dtype=torch.int32)
    ours = formats.popcount32(words)
    expect = [bin(int(v) & 0xFFFFFFFF).count("1") for v in words]
    assert ours.tolist() == expect


def test_bad_inputs():
    with pytest.raises(TypeError, match="bool"):
        formats.pack_bits(torch.ones(3, 4))
    with pytest.raises(ValueError, match="pad_bits"):
        formats.num_words(10, 48)
    with pytest.raises(TypeError, match="int32"):
        formats.unpack_bits(torch.ones(2, 2), 10)
    with pytest.raises(ValueError, match="K=100"):
        formats.unpack_bits(torch.zeros(2, 2, dtype=torch.int32), 100)


@pytest.mark.parametrize("shape,dim0,dim1", [((3, 128, 40), -1, -2), ((64, 5), 0, 1), ((2, 3, 256, 9), 1, 3), ((3, 130, 40), -1, -2)])
def test_pack_bits_of_strided_views_equals_contiguous(shape, dim0, dim1):
    """Packing reads a transposed / strided view (e.g. V^T of attention) like its contiguous copy
    (K a multiple of 64 included: no padding copy hides the strides)."""
    torch.manual_seed(sum(shape))
    bits = (torch.randn(shape) > 0).transpose(dim0, dim1)
    assert not bits.is_contiguous()
    want = formats.pack_bits(bits.contiguous())
    assert torch.equal(formats.pack_bits(bits), want)
    assert torch.equal(formats.unpack_bits(want, bits.shape[-1]), bits)
    assert torch.equal(formats.pack_bits(bits[..., ::2]), formats.pack_bits(bits[..., ::2].contiguous()))
