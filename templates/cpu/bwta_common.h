/* bwta_common.h: helpers shared by every generated CPU kernel.
 *
 * The rendered kernel defines BWTA_ISA (BWTA_ISA_PORTABLE | BWTA_ISA_AVX2 | BWTA_ISA_AVX512)
 * before including this header; everything ISA-specific sits behind that one macro, so the
 * templates are written once against a tiny vector API:
 *
 *   bv_t      a vector of BV_WORDS packed 64-bit words (bit vector)
 *   cnt_t     a popcount accumulator; cnt_add(c, v) adds popcount(v)
 *   CNT_STEPS how many cnt_add calls a counter absorbs before it must be drained
 *   sum_t     a drained count (sum_drain(s, c) adds counter c; sum_total(s) is the integer)
 *             (AVX2 counts in bytes: 31 steps x at most 8 per byte stays below 256)
 *
 * Conversions between fp16/bf16 and fp32 are written in integer arithmetic so the result is
 * the same on every ISA and equals torch's own round-to-nearest-even casts bit for bit.
 */
#ifndef BWTA_COMMON_H
#define BWTA_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BWTA_ISA_PORTABLE 0
#define BWTA_ISA_AVX2 1
#define BWTA_ISA_AVX512 2

#ifndef BWTA_ISA
#error "define BWTA_ISA before including bwta_common.h"
#endif

#if BWTA_ISA != BWTA_ISA_PORTABLE
#include <immintrin.h>
#endif

typedef uint64_t u64;
typedef int64_t i64;

#define BWTA_INLINE static inline __attribute__((always_inline))
#define BWTA_MIN(a, b) ((a) < (b) ? (a) : (b))

BWTA_INLINE i64 bwta_popc64(u64 v) { return (i64)__builtin_popcountll(v); }

/* ---- bit vectors and popcount counters, one block per ISA ------------------------------ */

#if BWTA_ISA == BWTA_ISA_AVX512
typedef __m512i bv_t;
typedef __m512i cnt_t;
#define BV_WORDS 8
#define CNT_STEPS (1L << 40) /* 64-bit lanes never overflow */
BWTA_INLINE bv_t bv_load(const u64 *p) { return _mm512_loadu_si512((const void *)p); }
BWTA_INLINE bv_t bv_and(bv_t a, bv_t b) { return _mm512_and_si512(a, b); }
BWTA_INLINE bv_t bv_xor(bv_t a, bv_t b) { return _mm512_xor_si512(a, b); }
/* a & (s ^ w) in one instruction: truth table 0x60 (0x28 is wrong, see toolchain notes). */
BWTA_INLINE bv_t bv_and_xor(bv_t a, bv_t s, bv_t w) { return _mm512_ternarylogic_epi64(a, s, w, 0x60); }
BWTA_INLINE cnt_t cnt_zero(void) { return _mm512_setzero_si512(); }
BWTA_INLINE cnt_t cnt_add(cnt_t c, bv_t v) { return _mm512_add_epi64(c, _mm512_popcnt_epi64(v)); }
typedef __m512i sum_t; /* counts already in 64-bit lanes: draining is a no-op */
BWTA_INLINE sum_t sum_drain(sum_t s, cnt_t c) { return _mm512_add_epi64(s, c); }
BWTA_INLINE i64 sum_total(sum_t s) { return (i64)_mm512_reduce_add_epi64(s); }

#elif BWTA_ISA == BWTA_ISA_AVX2
typedef __m256i bv_t;
typedef __m256i cnt_t;
#define BV_WORDS 4
#define CNT_STEPS 31
BWTA_INLINE bv_t bv_load(const u64 *p) { return _mm256_loadu_si256((const __m256i *)p); }
BWTA_INLINE bv_t bv_and(bv_t a, bv_t b) { return _mm256_and_si256(a, b); }
BWTA_INLINE bv_t bv_xor(bv_t a, bv_t b) { return _mm256_xor_si256(a, b); }
BWTA_INLINE bv_t bv_and_xor(bv_t a, bv_t s, bv_t w) { return _mm256_and_si256(a, _mm256_xor_si256(s, w)); }
BWTA_INLINE cnt_t cnt_zero(void) { return _mm256_setzero_si256(); }
/* Nibble lookup popcount (Mula): no vector popcount in AVX2; byte counters, drained by sum_drain. */
BWTA_INLINE __m256i nibble_lut(void) {
    return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
}
/* popcount of every byte of v */
BWTA_INLINE __m256i byte_popcnt(bv_t v) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    return _mm256_add_epi8(_mm256_shuffle_epi8(nibble_lut(), _mm256_and_si256(v, low)),
                           _mm256_shuffle_epi8(nibble_lut(), _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
}
BWTA_INLINE cnt_t cnt_add(cnt_t c, bv_t v) { return _mm256_add_epi8(c, byte_popcnt(v)); }
/* popcount of each 64-bit lane of v */
BWTA_INLINE __m256i lane_popcnt(bv_t v) { return _mm256_sad_epu8(byte_popcnt(v), _mm256_setzero_si256()); }
/* Nibble-split operands (BT on AVX2): the packer stores an activation plane as its low nibbles
 * (x & 0x0f..) and high nibbles ((x >> 4) & 0x0f..), so the masks that select nibbles for the
 * lookup are folded into the activation and cost nothing per word pair (8 ops instead of 9). */
BWTA_INLINE bv_t bv_srl4(bv_t v) { return _mm256_srli_epi16(v, 4); }
BWTA_INLINE cnt_t cnt_add_nib(cnt_t c, bv_t lo, bv_t hi) {
    return _mm256_add_epi8(_mm256_add_epi8(c, _mm256_shuffle_epi8(nibble_lut(), lo)), _mm256_shuffle_epi8(nibble_lut(), hi));
}
/* sum_t: a drained count in four 64-bit lanes (VPSADBW of the byte counters); the horizontal
 * total is left to the end of a dot product, where a tile can reduce several at once. */
typedef __m256i sum_t;
BWTA_INLINE sum_t sum_drain(sum_t s, cnt_t c) { return _mm256_add_epi64(s, _mm256_sad_epu8(c, _mm256_setzero_si256())); }
BWTA_INLINE i64 sum_total(sum_t s) {
    __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return (i64)(_mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1));
}
/* Totals of four sums as 32-bit lanes [a, b, c, d] (each total < 2^32: K bits at most). */
BWTA_INLINE __m128i sum_total4(sum_t a, sum_t b, sum_t c, sum_t d) {
    const __m256i ab = _mm256_or_si256(a, _mm256_slli_epi64(b, 32));
    const __m256i cd = _mm256_or_si256(c, _mm256_slli_epi64(d, 32));
    const __m256i q = _mm256_add_epi64(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
    return _mm_add_epi64(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
}

#else /* portable: one 64-bit word at a time; -march=native still gives a hardware popcnt */
typedef u64 bv_t;
typedef u64 cnt_t;
#define BV_WORDS 1
#define CNT_STEPS (1L << 40)
BWTA_INLINE bv_t bv_load(const u64 *p) { return *p; }
BWTA_INLINE bv_t bv_and(bv_t a, bv_t b) { return a & b; }
BWTA_INLINE bv_t bv_xor(bv_t a, bv_t b) { return a ^ b; }
BWTA_INLINE bv_t bv_and_xor(bv_t a, bv_t s, bv_t w) { return a & (s ^ w); }
BWTA_INLINE cnt_t cnt_zero(void) { return 0; }
BWTA_INLINE cnt_t cnt_add(cnt_t c, bv_t v) { return c + (u64)__builtin_popcountll(v); }
typedef u64 sum_t;
BWTA_INLINE sum_t sum_drain(sum_t s, cnt_t c) { return s + c; }
BWTA_INLINE i64 sum_total(sum_t s) { return (i64)s; }
#endif

/* Scalar twins of the vector ops, for the K words left over after the last full vector. */
BWTA_INLINE u64 sc_and(u64 a, u64 b) { return a & b; }
BWTA_INLINE u64 sc_xor(u64 a, u64 b) { return a ^ b; }
BWTA_INLINE u64 sc_and_xor(u64 a, u64 s, u64 w) { return a & (s ^ w); }
BWTA_INLINE i64 sc_add(i64 c, u64 v) { return c + bwta_popc64(v); }
#define BWTA_NIBBLE_MASK 0x0f0f0f0f0f0f0f0fULL
/* Rebuild a plane from its nibble-split halves (scalar tail words). */
BWTA_INLINE u64 sc_unnib(u64 lo, u64 hi) { return lo | (hi << 4); }

/* ---- OpenMP: the kernels run on the caller's thread count (torch.get_num_threads()) ---- */
#ifdef _OPENMP
#define BWTA_THREAD_ID() omp_get_thread_num()
#define BWTA_NUM_THREADS() omp_get_num_threads()
#else
#define BWTA_THREAD_ID() 0
#define BWTA_NUM_THREADS() 1
#endif

/* ---- scalar float conversions (exact, ISA independent) -------------------------------- */

BWTA_INLINE float bwta_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
BWTA_INLINE uint32_t bwta_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

BWTA_INLINE float bwta_bf16_to_f32(uint16_t h) { return bwta_bits_f32((uint32_t)h << 16); }

BWTA_INLINE float bwta_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 is exact in fp32 */
        float f = (float)man * 5.9604644775390625e-08f;
        return bwta_bits_f32(bwta_f32_bits(f) | sign);
    }
    if (exp == 31) return bwta_bits_f32(sign | 0x7f800000u | (man << 13));
    return bwta_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

/* Same as c10::BFloat16's round_to_nearest_even (NaN -> 0x7fc0). */
BWTA_INLINE uint16_t bwta_f32_to_bf16(float f) {
    if (f != f) return 0x7fc0u;
    uint32_t u = bwta_f32_bits(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Round-to-nearest-even fp32 -> fp16, as c10::Half (NaN -> sign | 0x7e00, overflow -> inf). */
BWTA_INLINE uint16_t bwta_f32_to_f16(float f) {
    uint32_t u = bwta_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;
    if (a >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 rounds to inf */
    if (a < 0x38800000u) {                       /* below 2^-14: a subnormal multiple of 2^-24 */
        float v = bwta_bits_f32(a) * 16777216.0f; /* exact power-of-two scaling */
        return sign | (uint16_t)nearbyintf(v);   /* default rounding mode = nearest even */
    }
    a += 0xc8000fffu + ((a >> 13) & 1u); /* rebias exponent by -112 and round to nearest even */
    return sign | (uint16_t)(a >> 13);
}

/* Element loaders by input dtype (the template picks one by name). */
BWTA_INLINE float ld_float32(const void *p, i64 i) { return ((const float *)p)[i]; }
BWTA_INLINE float ld_float16(const void *p, i64 i) { return bwta_f16_to_f32(((const uint16_t *)p)[i]); }
BWTA_INLINE float ld_bfloat16(const void *p, i64 i) { return bwta_bf16_to_f32(((const uint16_t *)p)[i]); }

/* ---- vector threshold compares: FV_LANES floats -> FV_LANES mask bits ------------------ */
/* Comparing the exact fp32 widening of an fp16/bf16 value against the exact fp32 widening
 * of a threshold already rounded to that dtype gives the same answer as comparing in the
 * dtype, which is how the eager reference defines the codes. */
#if BWTA_ISA == BWTA_ISA_AVX512
#define BWTA_HAVE_FV 1
#define FV_LANES 16
typedef __m512 fv_t;
BWTA_INLINE fv_t fv_float32(const void *p, i64 i) { return _mm512_loadu_ps((const float *)p + i); }
BWTA_INLINE fv_t fv_float16(const void *p, i64 i) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
}
BWTA_INLINE fv_t fv_bfloat16(const void *p, i64 i) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
BWTA_INLINE u64 fv_gt(fv_t x, float t) { return (u64)_mm512_cmp_ps_mask(x, _mm512_set1_ps(t), _CMP_GT_OQ); }
BWTA_INLINE u64 fv_lt(fv_t x, float t) { return (u64)_mm512_cmp_ps_mask(x, _mm512_set1_ps(t), _CMP_LT_OQ); }
BWTA_INLINE u64 fv_nge0(fv_t x) { return (u64)_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NGE_UQ); }
#elif BWTA_ISA == BWTA_ISA_AVX2
#define BWTA_HAVE_FV 1
#define FV_LANES 8
typedef __m256 fv_t;
BWTA_INLINE fv_t fv_float32(const void *p, i64 i) { return _mm256_loadu_ps((const float *)p + i); }
BWTA_INLINE fv_t fv_float16(const void *p, i64 i) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
}
BWTA_INLINE fv_t fv_bfloat16(const void *p, i64 i) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
BWTA_INLINE u64 fv_gt(fv_t x, float t) {
    return (u64)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(t), _CMP_GT_OQ));
}
BWTA_INLINE u64 fv_lt(fv_t x, float t) {
    return (u64)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(t), _CMP_LT_OQ));
}
BWTA_INLINE u64 fv_nge0(fv_t x) {
    return (u64)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NGE_UQ));
}
#endif

#endif /* BWTA_COMMON_H */
