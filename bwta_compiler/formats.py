"""Bit formats: the one place that defines how BWTA codes are stored.

Layout:

* Binary (weights, {-1,+1}): one plane, bit = 1 means -1.  Shape ``[..., Kw]``.
* Ternary (activations, {-1,0,+1}): two planes, P = [code == +1], N = [code == -1]; zero is
  neither.  Shape ``[..., 2, Kw]`` (plane 0 = P, plane 1 = N).
* Bool (probabilities / ReLU outputs, {0,1}): one plane.  Shape ``[..., Kw]``.

Bits are LSB-first: element k of a word sits at bit k.  Words are int32 along K, so two
consecutive words are the same bytes as one little-endian 64-bit word; the CPU kernels read
64-bit words and the GPU kernels 32-bit words from the same tensor.  K is padded with zero
bits up to a multiple of ``pad_bits`` (default 64); zero bits are neutral for every identity
except binary x binary, which therefore uses the true K.
"""

from __future__ import annotations

import sys

import torch

WORD_BITS = 32
DEFAULT_PAD_BITS = 64

# Bit weights of one int32 word, as int64 so the sum never overflows before the final wrap.
_BIT_WEIGHTS = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = torch.tensor([1 << i for i in range(WORD_BITS)], dtype=torch.int64, device=device)
    return _BIT_WEIGHTS[key]


def check_pad_bits(pad_bits: int) -> None:
    if pad_bits <= 0 or pad_bits % WORD_BITS:
        raise ValueError(f"pad_bits must be a positive multiple of {WORD_BITS}, got {pad_bits}")


def padded_k(k: int, pad_bits: int = DEFAULT_PAD_BITS) -> int:
    """K rounded up to a multiple of ``pad_bits`` (at least one pad unit, so K = 0 is rejected)."""
    check_pad_bits(pad_bits)
    if k <= 0:
        raise ValueError(f"K must be positive, got {k}")
    return -(-k // pad_bits) * pad_bits


def num_words(k: int, pad_bits: int = DEFAULT_PAD_BITS) -> int:
    """Number of int32 words that hold K bits after padding."""
    return padded_k(k, pad_bits) // WORD_BITS


def pack_bits(bits: torch.Tensor, pad_bits: int = DEFAULT_PAD_BITS) -> torch.Tensor:
    """Pack a boolean tensor ``[..., K]`` into int32 words ``[..., Kw]``, LSB-first, zero-padded."""
    if bits.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool tensor, got {bits.dtype}")
    if bits.dim() == 0:
        raise ValueError("pack_bits expects at least one dimension (K), got a scalar")
    k = bits.shape[-1]
    kp = padded_k(k, pad_bits)
    if kp != k:
        bits = torch.nn.functional.pad(bits, (0, kp - k))
    if sys.byteorder != "little":
        grouped = bits.reshape(*bits.shape[:-1], kp // WORD_BITS, WORD_BITS).to(torch.int64)
        words = (grouped * _bit_weights(bits.device)).sum(-1)
        # Wrap to the signed int32 range explicitly: values >= 2^31 become negative int32.
        words = torch.where(words >= (1 << 31), words - (1 << 32), words)
        return words.to(torch.int32)
    # Little-endian: four LSB-first bytes are one LSB-first int32 word, so pack bytes (8 shifts
    # on a tensor an eighth the size) and reinterpret; ~5x faster than summing int64 bit weights,
    # which matters when a BERT-base model's 85M weights are folded at compile time.
    b = bits.contiguous().reshape(*bits.shape[:-1], kp // 8, 8).to(torch.uint8)
    packed = b[..., 0].clone(memory_format=torch.contiguous_format)  # the int32 view needs unit stride
    for j in range(1, 8):
        packed |= b[..., j] << j
    return packed.view(torch.int32)


def unpack_bits(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words ``[..., Kw]`` -> bool ``[..., K]``."""
    if words.dtype != torch.int32:
        raise TypeError(f"unpack_bits expects int32 words, got {words.dtype}")
    kw = words.shape[-1]
    if k > kw * WORD_BITS or k <= 0:
        raise ValueError(f"cannot unpack K={k} from {kw} words ({kw * WORD_BITS} bits)")
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int64)
    bits = ((w.unsqueeze(-1) >> shifts) & 1).bool()
    return bits.reshape(*words.shape[:-1], kw * WORD_BITS)[..., :k]


# ---- codes <-> packed formats ---------------------------------------------------------------


def pack_binary_codes(codes: torch.Tensor, pad_bits: int = DEFAULT_PAD_BITS) -> torch.Tensor:
    """{-1,+1} codes ``[..., K]`` -> binary words ``[..., Kw]`` (bit 1 = -1)."""
    return pack_bits(codes < 0, pad_bits)


def pack_ternary_codes(codes: torch.Tensor, pad_bits: int = DEFAULT_PAD_BITS) -> torch.Tensor:
    """{-1,0,+1} codes ``[..., K]`` -> ternary words ``[..., 2, Kw]`` (P plane, N plane)."""
    return torch.stack([pack_bits(codes > 0, pad_bits), pack_bits(codes < 0, pad_bits)], dim=-2)


def pack_bool_codes(codes: torch.Tensor, pad_bits: int = DEFAULT_PAD_BITS) -> torch.Tensor:
    """{0,1} codes ``[..., K]`` -> bool words ``[..., Kw]``."""
    return pack_bits(codes > 0, pad_bits)


def unpack_binary_codes(words: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return 1 - 2 * unpack_bits(words, k).to(dtype)


def unpack_ternary_codes(words: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if words.dim() < 2 or words.shape[-2] != 2:
        raise ValueError(f"ternary words must have shape [..., 2, Kw], got {tuple(words.shape)}")
    p = unpack_bits(words[..., 0, :], k).to(dtype)
    n = unpack_bits(words[..., 1, :], k).to(dtype)
    return p - n


def unpack_bool_codes(words: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return unpack_bits(words, k).to(dtype)


def popcount32(words: torch.Tensor) -> torch.Tensor:
    """Population count of int32 words (as int64), SWAR in plain torch ops."""
    v = words.to(torch.int64) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24
