// Host emulation of the CUDA features the bwta kernels use (tests only).
//
// Every GPU thread of a block runs as a ucontext fiber on one host thread; warp collectives
// (mma.sync, shuffles, vote, __syncwarp) and __syncthreads are rendezvous points where a fiber
// yields until all participants arrived.  Blocks run one after another.  The inline-PTX
// primitives of bwta_common.cuh are defined here with the PTX semantics (m8n8k128 b1 fragment
// layout, prmt, set.*.u32.f16x2, cvt.rn), so the unchanged kernel sources can be checked bit
// for bit against the reference ops without a GPU.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <ucontext.h>
#include <vector>

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

struct EmuWarp {
    int count = 0;
    unsigned gen = 0;
    u32 a[32], b[32];
    int c0[32], c1[32];
    int iv[32], io[32];
    int lane_mask[32];
};

struct EmuFiber {
    ucontext_t ctx;
    emu_dim3 tid;
    bool done = false;
    std::vector<char> stack;
};

struct EmuState {
    emu_dim3 bidx, bdim, gdim;
    EmuFiber *cur = nullptr;
    ucontext_t main_ctx;
    std::vector<EmuFiber> fibers;
    std::vector<EmuWarp> warps;
    int alive = 0;
    int bar_count = 0;
    unsigned bar_gen = 0;
    unsigned long long progress = 0;
    std::function<void()> body;
    int error = 0;
};

inline EmuState &emu() {
    static EmuState s;
    return s;
}

#define threadIdx (emu().cur->tid)
#define blockIdx (emu().bidx)
#define blockDim (emu().bdim)
#define gridDim (emu().gdim)

inline void emu_yield() { swapcontext(&emu().cur->ctx, &emu().main_ctx); }
inline int emu_lane() { return (int)(threadIdx.x & 31); }
inline EmuWarp &emu_warp() { return emu().warps[threadIdx.x >> 5]; }

// Rendezvous of the 32 lanes of the calling warp; `last` runs once, in the last lane to arrive.
template <class F>
inline void emu_warp_rendezvous(F last) {
    EmuWarp &w = emu_warp();
    unsigned g = w.gen;
    emu().progress++;
    if (++w.count == 32) {
        last(w);
        w.count = 0;
        w.gen++;
        emu().progress++;
    } else {
        while (w.gen == g) emu_yield();
    }
}

inline void __syncthreads() {
    EmuState &s = emu();
    unsigned g = s.bar_gen;
    s.progress++;
    if (++s.bar_count == s.alive) {
        s.bar_count = 0;
        s.bar_gen++;
        s.progress++;
    } else {
        while (s.bar_gen == g) emu_yield();
    }
}

inline void __syncwarp(unsigned = 0xFFFFFFFFu) { emu_warp_rendezvous([](EmuWarp &) {}); }

inline int __shfl_xor_sync(unsigned, int v, int mask) {
    EmuWarp &w = emu_warp();
    int l = emu_lane();
    w.iv[l] = v;
    emu_warp_rendezvous([&](EmuWarp &ww) {
        for (int i = 0; i < 32; ++i) ww.io[i] = ww.iv[i ^ mask];
    });
    return w.io[l];
}

inline int __any_sync(unsigned, int pred) {
    EmuWarp &w = emu_warp();
    int l = emu_lane();
    w.iv[l] = pred != 0;
    emu_warp_rendezvous([&](EmuWarp &ww) {
        int any = 0;
        for (int i = 0; i < 32; ++i) any |= ww.iv[i];
        for (int i = 0; i < 32; ++i) ww.io[i] = any;
    });
    return w.io[l];
}

// mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc: lane l holds A row l/4, k bits
// [32*(l%4), +32); B column l/4, the same k bits; C row l/4, columns 2*(l%4) + {0, 1}.
inline void bwta_bmma_and(int &c0, int &c1, u32 a, u32 b) {
    EmuWarp &w = emu_warp();
    int l = emu_lane();
    w.a[l] = a;
    w.b[l] = b;
    w.c0[l] = c0;
    w.c1[l] = c1;
    emu_warp_rendezvous([](EmuWarp &ww) {
        int d[8][8];
        for (int r = 0; r < 8; ++r)
            for (int n = 0; n < 8; ++n) {
                int acc = 0;
                for (int c = 0; c < 4; ++c) acc += __builtin_popcount(ww.a[4 * r + c] & ww.b[4 * n + c]);
                d[r][n] = acc;
            }
        for (int i = 0; i < 32; ++i) {
            ww.io[i] = ww.c0[i] + d[i >> 2][2 * (i & 3)];
            ww.iv[i] = ww.c1[i] + d[i >> 2][2 * (i & 3) + 1];
        }
    });
    c0 = w.io[l];
    c1 = w.iv[l];
}

inline int __popc(u32 v) { return __builtin_popcount(v); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
template <class T> inline T __ldg(const T *p) { return *p; }
inline int atomicAdd(int *p, int v) { int o = *p; *p = o + v; return o; }
inline float __uint_as_float(u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
inline u32 __float_as_uint(float f) { u32 u; std::memcpy(&u, &f, 4); return u; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }

inline float bwta_h2f(u16 h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline u16 bwta_f2h(float f) { _Float16 x = (_Float16)f; u16 h; std::memcpy(&h, &x, 2); return h; }
inline u16 bwta_f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

template <class C>
inline u32 emu_hset2(u32 a, u32 b, C cmp) {
    u32 d = 0;
    for (int h = 0; h < 2; ++h) {
        float x = bwta_h2f((u16)(a >> (16 * h))), y = bwta_h2f((u16)(b >> (16 * h)));
        if (cmp(x, y)) d |= 0xFFFFu << (16 * h);
    }
    return d;
}
inline u32 bwta_hgt2(u32 a, u32 b) { return emu_hset2(a, b, [](float x, float y) { return x > y; }); }
inline u32 bwta_hlt2(u32 a, u32 b) { return emu_hset2(a, b, [](float x, float y) { return x < y; }); }
inline u32 bwta_hltu2(u32 a, u32 b) { return emu_hset2(a, b, [](float x, float y) { return !(x >= y); }); }

inline u32 emu_prmt(u32 a, u32 b, u32 sel) {
    u64 v = ((u64)b << 32) | a;
    u32 d = 0;
    for (int i = 0; i < 4; ++i) {
        u32 s = (sel >> (4 * i)) & 7u;
        d |= (u32)((v >> (8 * s)) & 0xFFu) << (8 * i);
    }
    return d;
}
inline u32 bwta_pair(u32 w_lo, u32 w_hi, bool odd) { return emu_prmt(w_lo, w_hi, odd ? 0x7632u : 0x5410u); }

inline void bwta_cp_async16(void *smem, const void *gmem, bool valid) {
    if (valid) std::memcpy(smem, gmem, 16); else std::memset(smem, 0, 16);
}
inline void bwta_cp_async4(void *smem, const void *gmem, bool valid) {
    if (valid) std::memcpy(smem, gmem, 4); else std::memset(smem, 0, 4);
}
inline void bwta_cp_async_commit() {}
template <int N> inline void bwta_cp_async_wait() {}

// ---- the scheduler --------------------------------------------------------------------------

inline void emu_fiber_main() {
    emu().body();
    emu().cur->done = true;
    emu().alive--;
    emu().progress++;
    EmuState &s = emu();
    if (s.bar_count > 0 && s.bar_count == s.alive) {  // exited threads count as arrived
        s.bar_count = 0;
        s.bar_gen++;
    }
    swapcontext(&emu().cur->ctx, &emu().main_ctx);
}

// Runs `body` as every thread of every block; returns 0, or 1 on a deadlock.
inline int emu_run(int gx, int gy, int gz, int bx, std::function<void()> body) {
    EmuState &s = emu();
    s.gdim = {(unsigned)gx, (unsigned)gy, (unsigned)gz};
    s.bdim = {(unsigned)bx, 1, 1};
    s.body = body;
    s.fibers.assign(bx, EmuFiber());
    for (auto &f : s.fibers) f.stack.resize(1 << 18);
    for (int z = 0; z < gz; ++z)
        for (int y = 0; y < gy; ++y)
            for (int x = 0; x < gx; ++x) {
                s.bidx = {(unsigned)x, (unsigned)y, (unsigned)z};
                s.warps.assign((bx + 31) / 32, EmuWarp());
                s.alive = bx;
                s.bar_count = 0;
                for (int t = 0; t < bx; ++t) {
                    EmuFiber &f = s.fibers[t];
                    f.done = false;
                    f.tid = {(unsigned)t, 0, 0};
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, (void (*)())emu_fiber_main, 0);
                }
                while (s.alive > 0) {
                    unsigned long long before = s.progress;
                    for (auto &f : s.fibers) {
                        if (f.done) continue;
                        s.cur = &f;
                        swapcontext(&s.main_ctx, &f.ctx);
                    }
                    if (s.progress == before && s.alive > 0) {
                        // one more full round without any release: deadlock
                        for (auto &f : s.fibers) {
                            if (f.done) continue;
                            s.cur = &f;
                            swapcontext(&s.main_ctx, &f.ctx);
                        }
                        if (s.progress == before) {
                            std::fprintf(stderr, "emu: deadlock in block (%d,%d,%d)\n", x, y, z);
                            return 1;
                        }
                    }
                }
            }
    return 0;
}
