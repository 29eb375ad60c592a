// The CUDA I2Correlation kernels (spec sections 3-4): float32, bfloat16, float16 inputs.
//
// Plain SIMT kernels: tiles are converted to float32 in shared memory and every product is
// an fp32 FMA, for every input dtype (no tensor cores; bf16/fp16 are converted to fp32 on
// load and accumulate in fp32). The per-element terms come from csrc/i2corr_math.h, the
// header the CPU kernels use too, so the CPU tests guard this arithmetic.
//
// Block layout (NT = 256 threads): thread (ty, tx) = (tid / 16, tid % 16) owns the score
// elements (ty + 16 a, tx + 16 b) of a tile and the output elements (ty + 16 a, tx + 16 c)
// of its rows, so the row reductions are shuffles over the 16 lanes of a half-warp and the
// rescaling factors stay in the thread. Shared-memory rows are padded by one float so that
// the strided reads hit distinct banks. Global tensors are addressed through their (batch,
// head, row) strides (params.h), so strided views are read and written in place.
//
// Kernels:
//   logz_kernel  logZ_i of the separable prior, one thread per query row (O(rows + cols)).
//   fwd_kernel   per (branch, b, h, query tile): pass 1 over key tiles (online max/sum, out),
//                pass 2 (only where stats are needed): exact p and t, row sums K, E, R1, R2.
//   dq_kernel    per (branch, b, h, query tile): dq and the five prior row sums -> dsigma.
//   dkdv_kernel  per (branch, bk, h, key tile): dk, dv; loops over the query tiles and, for a
//                batch-shared memory (Bk = 1), over the batch in order: deterministic, no atomics.
// Both branches of a fused call run in the same launches (blocks of branch 0, then branch 1).
// Each kernel has a plain variant (S = L, no mask: FOD's launches) and an extended one (template flag EXT):
// a key_padding_mask ((1 or B, S), True = ignore) and S = n_img * L keys, key j at grid position j % L,
// with the normaliser of the prior over the kept keys as lmax and logz (see LogzParams), as the CPU kernels.
// Headers: common.cuh (this: device helpers, the task decode and the query-side block info), logz.cuh,
// forward.cuh, backward.cuh (the kernels and their shared-memory layouts); launch configurations: launch.cuh.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/params.h"
#include "i2corr_math.h"

namespace i2c {

template <typename T> __device__ __forceinline__ float to_f(T x) { return static_cast<float>(x); }

__device__ __forceinline__ float hmax16(float x) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float hsum16(float x) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Rows [row0, row0 + R) of an (L, D) matrix with row stride ld (contiguous rows) into dst
// (R x (DMAX + 1) floats), zero-padded beyond L and beyond D.
template <typename T, int DMAX, int R>
__device__ __forceinline__ void load_tile(float* dst, gptr<const T> src, int64_t ld, int row0, int L, int D) {
  for (int idx = threadIdx.x; idx < R * DMAX; idx += NT) {
    const int r = idx / DMAX, d = idx % DMAX, gr = row0 + r;
    dst[r * (DMAX + 1) + d] = (gr < L && d < D) ? to_f(src[int64_t(gr) * ld + d]) : 0.0f;
  }
}

// Grid coordinates (row, col) of keys [j0, j0 + R).
template <int R>
__device__ __forceinline__ void load_coords(float* krow, float* kcol, int j0, int cols) {
  for (int jj = threadIdx.x; jj < R; jj += NT) {
    const int j = j0 + jj;
    krow[jj] = float(j / cols);
    kcol[jj] = float(j % cols);
  }
}

// acc[a][b] = <X row (rx + 16 a), Y row (ry + 16 b)> over DMAX floats, rows of stride DMAX + 1:
// sequential fp32 FMAs over d, register-blocked. Every kernel computes its scores with this
// function, so the forward and both backward kernels see bit-identical scores.
template <int DMAX, int NA, int NB>
__device__ __forceinline__ void tile_dot(float (&acc)[NA][NB], const float* X, const float* Y, int rx, int ry) {
  constexpr int SQ = DMAX + 1;
#pragma unroll
  for (int a = 0; a < NA; ++a)
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[a][b] = 0.0f;
#pragma unroll 4
  for (int d = 0; d < DMAX; ++d) {
    float x[NA], y[NB];
#pragma unroll
    for (int a = 0; a < NA; ++a) x[a] = X[(rx + 16 * a) * SQ + d];
#pragma unroll
    for (int b = 0; b < NB; ++b) y[b] = Y[(ry + 16 * b) * SQ + d];
#pragma unroll
    for (int a = 0; a < NA; ++a)
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[a][b] = fmaf(x[a], y[b], acc[a][b]);
  }
}

// Keys [j0, j0 + R) of an extended launch: grid coordinates of position j % L, and dead = 1 where the key
// is beyond S or masked (drop: the key_padding_mask row of this batch, or null), else 0.
template <int R>
__device__ __forceinline__ void load_keys(float* krow, float* kcol, float* dead, int j0, int cols, int L, int S,
                                          gptr<const bool> drop) {
  for (int jj = threadIdx.x; jj < R; jj += NT) {
    const int j = j0 + jj, pos = j % L;
    krow[jj] = float(pos / cols);
    kcol[jj] = float(pos % cols);
    dead[jj] = (j >= S || (drop && drop[j])) ? 1.0f : 0.0f;
  }
}

// The key_padding_mask row of batch b (null: none).
__device__ __forceinline__ gptr<const bool> mask_row(gptr<const bool> drop, int64_t bs, int64_t b) {
  return drop ? drop + b * bs : drop;
}

// Per query row: what the element terms need. The extended launches' lmax (see LogzParams) is kept in
// shared memory, not here: in registers it made the D = 128 forward spill.
struct Row {
  float lse, qr, qc, cy, cx, logz;
};

// sigma: the (L, 2) float32 widths of one (batch, head), row stride sl; logz: its (L) row vector.
template <typename T>
__device__ __forceinline__ Row make_row(int i, int cols, float lse, gptr<const float> sigma, int64_t sl,
                                        gptr<const float> logz) {
  Row r;
  r.lse = lse;
  r.qr = float(i / cols);
  r.qc = float(i % cols);
  r.cy = i2c::half_inv_sq<float>(i2c::sigma_eff<float>(to_f(sigma[i * sl])));
  r.cx = i2c::half_inv_sq<float>(i2c::sigma_eff<float>(to_f(sigma[i * sl + 1])));
  r.logz = logz[i];
  return r;
}

// The (L, D) or (L, 2) matrix of (batch b, head h) of a strided tensor.
template <typename P>
__device__ __forceinline__ P slab(P base, const Strides& s, int64_t b, int64_t h) {
  return base + (b * s.b + h * s.h);
}

// Exact p and t of one element and their log terms.
struct Elem {
  float p, t;
  i2c::LogTerms<float> g;
};

// lmax: the row's lmax in an extended launch (EXT), unused otherwise.
template <bool EXT>
__device__ __forceinline__ Elem element(float s, const Row& r, float kr, float kc, float eps, float lmax) {
  Elem e;
  const float lp = s - r.lse;
  const float l = i2c::axis_logw<float>(r.qr, kr, r.cy) + i2c::axis_logw<float>(r.qc, kc, r.cx);
  const float lt = EXT ? (l - lmax) - r.logz : l - r.logz;
  e.p = i2c::fast_exp<float>(lp);
  e.t = i2c::fast_exp<float>(lt);
  e.g = i2c::log_terms<float>(e.p, e.t, lp, lt, eps);
  return e;
}

// Decode a flat block index into (branch, batch-or-bk, head, tile).
struct Task {
  int br, b, h, tile;
};

// nt0, nt1: tiles per (batch, head) of branch 0 and 1 (they differ for key tiles when the branches' S do).
__device__ __forceinline__ Task decode(const int64_t* first, int H, int nt0, int nt1) {
  Task t;
  int64_t idx = blockIdx.x;
  t.br = idx >= first[1] ? 1 : 0;
  idx -= t.br ? first[1] : 0;
  const int ntiles = t.br ? nt1 : nt0;
  t.tile = int(idx % ntiles);
  const int64_t bh = idx / ntiles;
  t.b = int(bh / H);
  t.h = int(bh % H);
  return t;
}
// What one block of a query-side kernel (forward, dq) works on (FlashAttention's BlockInfo): its branch, batch,
// head and query tile, decoded from blockIdx.x, the branch's parameters and the offsets that follow.
template <typename Branch, int BM, int BN, bool EXT>
struct QueryBlock {
  Task task;
  Branch Bp;              // this block's branch
  int D, i0, S, nkt;      // head dim, first query row, keys (L in the plain launches), key tiles
  int64_t bh, bk;         // row block of the (B, H, L) row vectors; key batch (0 for a batch-shared memory)
  gptr<const bool> drop;  // this batch's key_padding_mask row (EXT), or null

  template <typename Params>
  __device__ __forceinline__ explicit QueryBlock(const Params& P)
      : task(decode(P.first, P.H, (P.L + BM - 1) / BM, (P.L + BM - 1) / BM)),
        Bp(task.br == 0 ? P.br[0] : P.br[1]),
        D(Bp.D),
        i0(task.tile * BM),
        S(EXT ? Bp.S : P.L),
        nkt((S + BN - 1) / BN),
        bh(int64_t(task.b) * P.H + task.h),
        bk(Bp.Bk == 1 ? 0 : task.b),
        drop(EXT ? mask_row(Bp.drop, Bp.drop_bs, task.b) : gptr<const bool>()) {}
};

}  // namespace i2c
