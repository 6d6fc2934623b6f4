// bwta_common.cuh: device helpers shared by the generated BWTA kernels.
//
// Passed to NVRTC through an include path (-I<templates/cuda>), never pasted in by Jinja.
// Needs no CUDA header: half and bfloat16 values travel as raw 16-bit words and are converted
// with inline PTX, so nothing here includes cuda_fp16.h.
//
// Bit formats (bwta_compiler/formats.py): LSB-first, element k of a word at bit k.
//   binary  : bit 1 = -1 (weights: s)        ternary : P = [code == +1], N = [code == -1]
//   bool    : bit 1 = code 1
// Sm_90 runs only `.and.popc` binary MMA natively (`.xor.popc` is emulated with two AND MMAs),
// so every identity below is written with AND and complements:
//   BT  (ternary x binary s):  sum = 2*(apc(P,~s) + apc(N,s)) - popc(P) - popc(N)
//   B1  (binary a x binary s): sum = K - 2*(apc(a,~s) + apc(~a,s))     (~a limited to k < K)
//   TT  sum = apc(Pa,Pb) + apc(Na,Nb) + apc(Pa,~Nb) + apc(Na,~Pb) - popc(Pa) - popc(Na)
//   UT  sum = apc(A,Pb) + apc(A,~Nb) - popc(A)
#pragma once

// Host emulation (tests only): the inline-PTX primitives below come from the emulator's header,
// everything else in this file is compiled unchanged for the host.
#ifdef BWTA_HOST_EMULATION
#include "bwta_emu_primitives.h"
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

// ---- scalar conversions (round to nearest even, like torch's casts) -----------------------

#ifndef BWTA_HOST_EMULATION
__device__ __forceinline__ float bwta_h2f(u16 h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}
#endif


__device__ __forceinline__ float bwta_bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }

#ifndef BWTA_HOST_EMULATION
__device__ __forceinline__ u16 bwta_f2h(float f) {
    u16 h;
    asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
    return h;
}
#endif


#ifndef BWTA_HOST_EMULATION
__device__ __forceinline__ u16 bwta_f2bf(float f) {
    u16 h;
    asm("{ .reg .b16 t; cvt.rn.bf16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
    return h;
}
#endif


// The epilogue of DESIGN.md: float(acc) * scale + bias in fp32, two roundings, no FMA.
__device__ __forceinline__ float bwta_epilogue(int acc, float scale, float bias, bool has_scale, bool has_bias) {
    float y = (float)acc;
    if (has_scale) y = __fmul_rn(y, scale);
    if (has_bias) y = __fadd_rn(y, bias);
    return y;
}

// ---- packed f16x2 / bf16x2 comparisons: two halves per instruction -------------------------

// Each 16-bit lane of the result is 0xFFFF where (a_lane > b_lane), else 0 (NaN -> 0).
#ifndef BWTA_HOST_EMULATION
__device__ __forceinline__ u32 bwta_hgt2(u32 a, u32 b) {
    u32 d;
    asm("set.gt.u32.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
#endif


#ifndef BWTA_HOST_EMULATION
__device__ __forceinline__ u32 bwta_hlt2(u32 a, u32 b) {
    u32 d;
    asm("set.lt.u32.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
#endif


// !(a >= b) per lane (NaN -> true): the sign quantizer's "-1" bit.
#ifndef BWTA_HOST_EMULATION
__device__ __forceinline__ u32 bwta_hltu2(u32 a, u32 b) {
    u32 d;
    asm("set.ltu.u32.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
#endif


// Word with element j (low half of word lo_w / hi_w selected by odd) and element j+16.
#ifndef BWTA_HOST_EMULATION
__device__ __forceinline__ u32 bwta_pair(u32 w_lo, u32 w_hi, bool odd) {
    u32 d;
    if (odd) asm("prmt.b32 %0, %1, %2, 0x7632;" : "=r"(d) : "r"(w_lo), "r"(w_hi));
    else     asm("prmt.b32 %0, %1, %2, 0x5410;" : "=r"(d) : "r"(w_lo), "r"(w_hi));
    return d;
}
#endif


// ---- quantize + pack 32 consecutive values into one word per plane ------------------------
// ACT: 0 = ternary (P, N), 1 = bool (P only, N = 0), 2 = binary sign (P = [!(x >= 0)], N = ~P
// over valid elements).  t is the threshold already rounded to the input dtype (host side,
// bwta_compiler.ops.ternary_thresholds / bool_thresholds), as a float: comparisons in float of
// exactly converted values equal comparisons in the input dtype.

template <int ACT>
__device__ __forceinline__ void bwta_bits_f32(float x, float t, int k, u32 &P, u32 &N) {
    if (ACT == 0) {
        P |= (u32)(x > t) << k;
        N |= (u32)(x < -t) << k;
    } else if (ACT == 1) {
        P |= (u32)(x > t) << k;
    } else {
        u32 neg = !(x >= 0.0f);
        P |= neg << k;
        N |= (neg ^ 1u) << k;
    }
}

// 16 words of fp16 (32 values, element i in word i/2, low half first) -> P, N with element i at bit i.
// The paper's instruction-level parallel packing: element j and element j+16 share one f16x2
// compare, landing at bits j and j+16.
template <int ACT>
__device__ __forceinline__ void bwta_pack32_f16(const u32 *w, u32 t2, u32 &P, u32 &N) {
    u32 p = 0, n = 0;
    const u32 neg_t2 = t2 ^ 0x80008000u;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        u32 a = bwta_pair(w[j >> 1], w[8 + (j >> 1)], j & 1);
        if (ACT == 0) {
            p |= (bwta_hgt2(a, t2) & 0x00010001u) << j;
            n |= (bwta_hlt2(a, neg_t2) & 0x00010001u) << j;
        } else if (ACT == 1) {
            p |= (bwta_hgt2(a, t2) & 0x00010001u) << j;
        } else {
            u32 neg = bwta_hltu2(a, 0u) & 0x00010001u;
            p |= neg << j;
            n |= (neg ^ 0x00010001u) << j;
        }
    }
    P = p;
    N = n;
}

// Same for bf16 (values extracted exactly into floats; two per 32-bit word).
template <int ACT>
__device__ __forceinline__ void bwta_pack32_bf16(const u32 *w, float t, u32 &P, u32 &N) {
    u32 p = 0, n = 0;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        float lo = __uint_as_float(w[j] << 16), hi = __uint_as_float(w[j] & 0xFFFF0000u);
        bwta_bits_f32<ACT>(lo, t, 2 * j, p, n);
        bwta_bits_f32<ACT>(hi, t, 2 * j + 1, p, n);
    }
    P = p;
    N = n;
}

template <int ACT>
__device__ __forceinline__ void bwta_pack32_f32(const float *x, float t, u32 &P, u32 &N) {
    u32 p = 0, n = 0;
#pragma unroll
    for (int j = 0; j < 32; ++j) bwta_bits_f32<ACT>(x[j], t, j, p, n);
    P = p;
    N = n;
}

// Element-wise packer for tails and unaligned rows: values [k0, k0+32) of a row of length K
// (elements >= K give zero bits in both planes).  DT: 0 = fp32, 1 = fp16, 2 = bf16.
template <int ACT, int DT>
__device__ __forceinline__ void bwta_pack32_tail(const void *row, int k0, int K, float t, u32 &P, u32 &N) {
    u32 p = 0, n = 0;
    for (int j = 0; j < 32; ++j) {
        int k = k0 + j;
        if (k < K) {
            float x;
            if (DT == 0) x = ((const float *)row)[k];
            else if (DT == 1) x = bwta_h2f(((const u16 *)row)[k]);
            else x = bwta_bf2f(((const u16 *)row)[k]);
            bwta_bits_f32<ACT>(x, t, j, p, n);
        }
    }
    P = p;
    N = n;
}

// ---- binary tensor-core MMA (AND + popcount only) -------------------------------------------

// D += popc(A & B) on an m8n8k128 tile: a, b one 32-bit fragment register each, 2 s32 accumulators.
#ifndef BWTA_HOST_EMULATION
__device__ __forceinline__ void bwta_bmma_and(int &c0, int &c1, u32 a, u32 b) {
    asm volatile(
        "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc "
        "{%0, %1}, {%2}, {%3}, {%0, %1};"
        : "+r"(c0), "+r"(c1)
        : "r"(a), "r"(b));
}
#endif


// Sum over the 4 lanes of a quad (the lanes that hold one m8n8k128 fragment row).
__device__ __forceinline__ int bwta_quad_sum(int v) {
    v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
    v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
    return v;
}

__device__ __forceinline__ int bwta_warp_sum(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

// ---- asynchronous global -> shared copies (sm_80+) ------------------------------------------

#ifndef BWTA_HOST_EMULATION
__device__ __forceinline__ void bwta_cp_async16(void *smem, const void *gmem, bool valid) {
    u32 s = (u32)__cvta_generic_to_shared(smem);
    int bytes = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(bytes));
}
#endif


#ifndef BWTA_HOST_EMULATION
__device__ __forceinline__ void bwta_cp_async_commit() { asm volatile("cp.async.commit_group;"); }
#endif

#ifndef BWTA_HOST_EMULATION
template <int N>
__device__ __forceinline__ void bwta_cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
#endif

// Store one output value in the output dtype (OT: 0 = fp32, 1 = fp16, 2 = bf16).
template <int OT>
__device__ __forceinline__ void bwta_store(void *out, long long idx, float y) {
    if (OT == 0) ((float *)out)[idx] = y;
    else if (OT == 1) ((u16 *)out)[idx] = bwta_f2h(y);
    else ((u16 *)out)[idx] = bwta_f2bf(y);
}

// 4-byte async copy (for rows whose word count is not a multiple of 4): zero-filled if !valid.
#ifndef BWTA_HOST_EMULATION
__device__ __forceinline__ void bwta_cp_async4(void *smem, const void *gmem, bool valid) {
    u32 s = (u32)__cvta_generic_to_shared(smem);
    int bytes = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(s), "l"(gmem), "r"(bytes));
}
#endif


// Quantize + pack the 32 values [k0, k0 + 32) of one row (row length K elements) into P and N.
// DT: 0 = fp32, 1 = fp16, 2 = bf16.  VEC: rows are 16-byte aligned (K * size % 16 == 0 and an
// aligned base), so full chunks load as 16-byte vectors; tails go element by element.
template <int ACT, int DT, bool VEC>
__device__ __forceinline__ void bwta_pack_chunk(const void *row, int k0, int K, float t, u32 t2, u32 &P, u32 &N) {
    if (VEC && k0 + 32 <= K) {
        if (DT == 0) {
            // 8 x 16-byte loads, packed as they arrive (keeps 32 floats from being live at once)
            const float4 *src = (const float4 *)((const float *)row + k0);
            u32 p = 0u, n = 0u;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float4 q = __ldg(src + i);
                bwta_bits_f32<ACT>(q.x, t, 4 * i, p, n);
                bwta_bits_f32<ACT>(q.y, t, 4 * i + 1, p, n);
                bwta_bits_f32<ACT>(q.z, t, 4 * i + 2, p, n);
                bwta_bits_f32<ACT>(q.w, t, 4 * i + 3, p, n);
            }
            P = p;
            N = n;
        } else {
            const uint4 *src = (const uint4 *)((const u16 *)row + k0);
            u32 w[16];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                uint4 q = __ldg(src + i);
                w[4 * i] = q.x; w[4 * i + 1] = q.y; w[4 * i + 2] = q.z; w[4 * i + 3] = q.w;
            }
            if (DT == 1) bwta_pack32_f16<ACT>(w, t2, P, N);
            else bwta_pack32_bf16<ACT>(w, t, P, N);
        }
    } else if (k0 < K) {
        bwta_pack32_tail<ACT, DT>(row, k0, K, t, P, N);
    } else {
        P = 0u;
        N = 0u;
    }
}

// f16x2 word holding the fp16 value of t in both lanes (t is exactly representable).
__device__ __forceinline__ u32 bwta_half2_of(float t) {
    u32 h = bwta_f2h(t);
    return h | (h << 16);
}

// ---- quantize + pack of attention operands (pack_act.cu.jinja instantiates this) -------------

template <int DT>
__device__ __forceinline__ float bwta_load_x(const void *x, long long i) {
    if (DT == 0) return ((const float *)x)[i];
    if (DT == 1) return bwta_h2f(((const u16 *)x)[i]);
    return bwta_bf2f(((const u16 *)x)[i]);
}

// Element of bit b of word wd.  PERM: bit b of word c within each 128-bit group holds element
// 8*(b/2) + 2*(c%4) + b%2 of the group (the lane order of m8n8k128 accumulators, see attn_fused).
template <bool PERM>
__device__ __forceinline__ int bwta_elem_of_bit(int wd, int b) {
    return PERM ? (wd >> 2) * 128 + 8 * (b >> 1) + 2 * (wd & 3) + (b & 1) : wd * 32 + b;
}

// rows mode       : x [B, R, K] (K contiguous)  -> out [B, R, PLANES, KWP]
// transposed mode : x [B, K, R] (R contiguous)  -> out [B, R, PLANES, KWP]
template <int ACT, int DT, bool VEC, int PLANES, bool TRANSPOSED, bool PERM>
__device__ __forceinline__ void bwta_pack_operand(const void *__restrict__ x, u32 *__restrict__ out, int B, int R,
                                                  int K, int KWP, float t) {
    const long long total = (long long)B * R * KWP;
    const u32 t2 = (DT == 1) ? bwta_half2_of(t) : 0u;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        u32 p = 0u, q = 0u;
        long long row;
        int wd;
        if (TRANSPOSED) {
            // consecutive threads take consecutive r: the strided reads coalesce across the warp
            const int r = (int)(i % R);
            const long long rest = i / R;
            wd = (int)(rest % KWP);
            const long long b = rest / KWP;
            const long long base = b * (long long)K * R + r;
            for (int j = 0; j < 32; ++j) {
                const int k = bwta_elem_of_bit<PERM>(wd, j);
                if (k < K) bwta_bits_f32<ACT>(bwta_load_x<DT>(x, base + (long long)k * R), t, j, p, q);
            }
            row = b * R + r;
        } else {
            wd = (int)(i % KWP);
            row = i / KWP;
            if (PERM) {
                const long long base = row * K;
                for (int j = 0; j < 32; ++j) {
                    const int k = bwta_elem_of_bit<PERM>(wd, j);
                    if (k < K) bwta_bits_f32<ACT>(bwta_load_x<DT>(x, base + k), t, j, p, q);
                }
            } else {
                const int esize = (DT == 0) ? 4 : 2;
                bwta_pack_chunk<ACT, DT, VEC>((const char *)x + row * K * esize, wd * 32, K, t, t2, p, q);
            }
        }
        u32 *o = out + row * (PLANES * KWP);
        o[wd] = p;
        if (PLANES == 2) o[KWP + wd] = q;
    }
}
