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
// Launch configurations and shared-memory sizes: launch.cuh.
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

// ---------------------------------------------------------------------------------------
// logZ_i = log sum_r exp(-(row_i - r)^2 / 2 sy^2) + log sum_c exp(-(col_i - c)^2 / 2 sx^2).
// ---------------------------------------------------------------------------------------
// Extended launches (EXT): lmax and logz over the kept keys of S = n_img * L (see LogzParams); without a mask
// lmax = 0 (the own position) and logz = log Z_i + log n_img; with one, an O(S) loop over the keys.
template <typename T, bool EXT>
__global__ void __launch_bounds__(NT) logz_kernel(LogzParams<T> P) {
  const int64_t idx = int64_t(blockIdx.x) * NT + threadIdx.x;
  if (idx >= P.n * P.nbranch) return;
  const int br = idx >= P.n ? 1 : 0;
  const int64_t r = idx - br * P.n, bh = r / P.L;
  const int i = int(r % P.L);
  const Strides ss = br == 0 ? P.ss[0] : P.ss[1];  // constant indices: no local-memory copy
  const gptr<const float> sg = slab(br == 0 ? P.sigma[0] : P.sigma[1], ss, bh / P.H, bh % P.H) + i * ss.l;
  const float cy = i2c::half_inv_sq<float>(i2c::sigma_eff<float>(to_f(sg[0]))),
              cx = i2c::half_inv_sq<float>(i2c::sigma_eff<float>(to_f(sg[1])));
  const float qr = float(i / P.cols), qc = float(i % P.cols);
  if (!EXT) {
    (br == 0 ? P.logz[0] : P.logz[1])[r] = i2c::axis_log_norm<float>(qr, cy, P.rows) +
                    i2c::axis_log_norm<float>(qc, cx, P.cols);
    return;
  }
  const int S = br == 0 ? P.S[0] : P.S[1];
  const gptr<const bool> drop = mask_row(br == 0 ? P.drop[0] : P.drop[1], br == 0 ? P.drop_bs[0] : P.drop_bs[1],
                                         bh / P.H);
  float lmax = 0.0f, lz;
  if (!drop) {
    lz = i2c::axis_log_norm<float>(qr, cy, P.rows) + i2c::axis_log_norm<float>(qc, cx, P.cols) +
         i2c::fast_log<float>(float(S / P.L));
  } else {  // a fully masked row: lmax = -inf, z = 0 (the caller refuses such rows)
    lmax = -INFINITY;
    for (int j = 0; j < S; ++j)
      if (!drop[j]) {
        const int pos = j % P.L;
        lmax = fmaxf(lmax, i2c::axis_logw<float>(qr, float(pos / P.cols), cy) +
                               i2c::axis_logw<float>(qc, float(pos % P.cols), cx));
      }
    float z = 0.0f;
    for (int j = 0; j < S; ++j)
      if (!drop[j]) {
        const int pos = j % P.L;
        z += i2c::fast_exp<float>(i2c::axis_logw<float>(qr, float(pos / P.cols), cy) +
                                  i2c::axis_logw<float>(qc, float(pos % P.cols), cx) - lmax);
      }
    lz = i2c::fast_log<float>(z);
  }
  (br == 0 ? P.logz[0] : P.logz[1])[r] = lz;
  (br == 0 ? P.lmax[0] : P.lmax[1])[r] = lmax;
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

template <int DMAX, int BM, int BN> constexpr size_t fwd_smem() {
  return sizeof(float) * (size_t(BM + BN) * (DMAX + 1) + size_t(BM) * (BN + 1) + 3 * BN + BM);
}

// ---------------------------------------------------------------------------------------
// Forward. EXT: an extended launch (key_padding_mask, S = n_img * L keys); the plain launches compile
// without that code.
// ---------------------------------------------------------------------------------------
// The body of both forward kernels (below): the plain and the extended one differ in their launch bounds.
template <typename T, int DMAX, int BM, int BN, bool EXT>
__device__ __forceinline__ void fwd_block(const FwdParams<T>& P) {
  constexpr int MA = BM / 16, NB = BN / 16, NC = DMAX / 16, SQ = DMAX + 1, SP = BN + 1;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DMAX % 16 == 0, "tiles are multiples of 16");
  I2C_DYNAMIC_SMEM(smem);
  float* Qs = smem;            // BM x SQ
  float* KVs = Qs + BM * SQ;   // BN x SQ: K, then V of the current key tile
  float* Ps = KVs + BN * SQ;   // BM x SP
  float* krow = Ps + BM * SP;  // BN
  float* kcol = krow + BN;     // BN
  float* kdead = kcol + BN;    // BN (EXT)
  float* rlm = kdead + BN;     // BM: lmax of the tile's rows (EXT)

  const int L = P.L, H = P.H, cols = P.cols;
  const int nqt = (L + BM - 1) / BM;
  const Task task = decode(P.first, H, nqt, nqt);
  const FwdBranch<T> Bp = task.br == 0 ? P.br[0] : P.br[1];
  const int D = Bp.D, i0 = task.tile * BM, S = EXT ? Bp.S : L, nkt = (S + BN - 1) / BN;
  const gptr<const bool> drop = EXT ? mask_row(Bp.drop, Bp.drop_bs, task.b) : gptr<const bool>();
  const int64_t bh = int64_t(task.b) * H + task.h;  // row block of the (B, H, L) row vectors
  const int64_t bk = Bp.Bk == 1 ? 0 : task.b;       // key batch
  const gptr<const T> q = slab(Bp.q, Bp.sq, task.b, task.h);
  const gptr<const T> k = slab(Bp.k, Bp.sk, bk, task.h);
  const gptr<const T> v = slab(Bp.v, Bp.sv, bk, task.h);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const float scale = P.scale;

  load_tile<T, DMAX, BM>(Qs, q, Bp.sq.l, i0, L, D);

  float m[MA], l[MA], o[MA][NC];
#pragma unroll
  for (int a = 0; a < MA; ++a) {
    m[a] = -INFINITY;
    l[a] = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; ++c) o[a][c] = 0.0f;
  }

  // Pass 1: online softmax and out.
  for (int kt = 0; kt < nkt; ++kt) {
    const int j0 = kt * BN;
    __syncthreads();  // the previous V tile is no longer read
    load_tile<T, DMAX, BN>(KVs, k, Bp.sk.l, j0, S, D);
    if (EXT) load_keys<BN>(krow, kcol, kdead, j0, cols, L, S, drop);
    __syncthreads();
    float s[MA][NB];
    tile_dot<DMAX, MA, NB>(s, Qs, KVs, ty, tx);
#pragma unroll
    for (int a = 0; a < MA; ++a)
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const bool live = EXT ? kdead[tx + 16 * b] == 0.0f : j0 + tx + 16 * b < L;
        s[a][b] = live ? scale * s[a][b] : -INFINITY;
      }
#pragma unroll
    for (int a = 0; a < MA; ++a) {
      float mx = s[a][0];
#pragma unroll
      for (int b = 1; b < NB; ++b) mx = fmaxf(mx, s[a][b]);
      mx = hmax16(mx);
      // Plain: finite, every key tile holds at least one key. EXT: -inf while every key so far was masked;
      // the shift is then 0 (alpha = 0 over l = 0, p = 0).
      const float mnew = fmaxf(m[a], mx);
      const float mref = (EXT && mnew == -INFINITY) ? 0.0f : mnew;
      const float alpha = expf(m[a] - mref);
      float sum = 0.0f;
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const float p = expf(s[a][b] - mref);  // 0 for the masked keys
        Ps[(ty + 16 * a) * SP + tx + 16 * b] = p;
        sum += p;
      }
      sum = hsum16(sum);
      l[a] = l[a] * alpha + sum;
      m[a] = mnew;
#pragma unroll
      for (int c = 0; c < NC; ++c) o[a][c] *= alpha;
    }
    __syncthreads();  // K no longer read, P complete
    load_tile<T, DMAX, BN>(KVs, v, Bp.sv.l, j0, S, D);
    __syncthreads();
#pragma unroll 4
    for (int jj = 0; jj < BN; ++jj) {
      float vj[NC];
#pragma unroll
      for (int c = 0; c < NC; ++c) vj[c] = KVs[jj * SQ + tx + 16 * c];
#pragma unroll
      for (int a = 0; a < MA; ++a) {
        const float p = Ps[(ty + 16 * a) * SP + jj];
#pragma unroll
        for (int c = 0; c < NC; ++c) o[a][c] = fmaf(p, vj[c], o[a][c]);
      }
    }
  }

  float lse[MA];
#pragma unroll
  for (int a = 0; a < MA; ++a) {
    lse[a] = m[a] + logf(l[a]);
    const int i = i0 + ty + 16 * a;
    if (i < L) {
      const float inv = 1.0f / l[a];
      const gptr<T> orow = slab(Bp.out, Bp.so, task.b, task.h) + i * Bp.so.l;
#pragma unroll
      for (int c = 0; c < NC; ++c)
        if (tx + 16 * c < D) orow[tx + 16 * c] = T(o[a][c] * inv);
      if (tx == 0) Bp.lse[bh * L + i] = lse[a];
    }
  }
  if (!Bp.need) return;  // uniform over the block

  // Pass 2: exact p and t, row sums of K, E, R1, R2.
  Row rw[MA];
  float kl[MA], en[MA], r1[MA], r2[MA];
#pragma unroll
  for (int a = 0; a < MA; ++a) {
    const int i = min(i0 + ty + 16 * a, L - 1);  // padding rows compute on a real row, never written
    rw[a] = make_row<T>(i, cols, lse[a], slab(Bp.sigma, Bp.ss, task.b, task.h), Bp.ss.l, Bp.logz + bh * L);
    kl[a] = en[a] = r1[a] = r2[a] = 0.0f;
  }
  if (EXT)  // read after the __syncthreads that opens the key loop
    for (int ii = tid; ii < BM; ii += NT) rlm[ii] = Bp.lmax[bh * L + min(i0 + ii, L - 1)];
  for (int kt = 0; kt < nkt; ++kt) {
    const int j0 = kt * BN;
    __syncthreads();
    load_tile<T, DMAX, BN>(KVs, k, Bp.sk.l, j0, S, D);
    if (EXT)
      load_keys<BN>(krow, kcol, kdead, j0, cols, L, S, drop);
    else
      load_coords<BN>(krow, kcol, j0, cols);
    __syncthreads();
    float s[MA][NB];
    tile_dot<DMAX, MA, NB>(s, Qs, KVs, ty, tx);
#pragma unroll
    for (int a = 0; a < MA; ++a)
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const int jj = tx + 16 * b;
        if (EXT ? kdead[jj] == 0.0f : j0 + jj < L) {
          const Elem e = element<EXT>(scale * s[a][b], rw[a], krow[jj], kcol[jj], P.eps,
                                      EXT ? rlm[ty + 16 * a] : 0.0f);
          kl[a] += i2c::kl_elem<float>(e.p, e.t, e.g);
          en[a] += i2c::ent_elem<float>(e.p, e.g);
          r1[a] += i2c::r1_elem<float>(e.p, e.t, e.g);
          r2[a] += i2c::r2_elem<float>(e.p, e.g);
        }
      }
  }
#pragma unroll
  for (int a = 0; a < MA; ++a) {
    const float K = hsum16(kl[a]), E = hsum16(en[a]), R1 = hsum16(r1[a]), R2 = hsum16(r2[a]);
    const int i = i0 + ty + 16 * a;
    if (tx == 0 && i < L) {
      Bp.kl[bh * L + i] = K;
      Bp.ent[bh * L + i] = E;
      Bp.r1[bh * L + i] = R1;
      Bp.r2[bh * L + i] = R2;
    }
  }
}

template <typename T, int DMAX, int BM, int BN>
__global__ void __launch_bounds__(NT) fwd_kernel(FwdParams<T> P) {
  fwd_block<T, DMAX, BM, BN, false>(P);
}

// (NT, 1): capped at 128 registers (ptxas's choice without the minimum), the D = 128 variant spilled 16
// bytes on sm_90; with it, no stack.
template <typename T, int DMAX, int BM, int BN>
__global__ void __launch_bounds__(NT, 1) fwd_ext_kernel(FwdParams<T> P) {
  fwd_block<T, DMAX, BM, BN, true>(P);
}

// ---------------------------------------------------------------------------------------
// Backward, query side: dq and dsigma.
// ---------------------------------------------------------------------------------------
template <int DMAX, int BM, int BN> constexpr size_t dq_smem() {
  return sizeof(float) * (2 * size_t(BM + BN) * (DMAX + 1) + size_t(BM) * (BN + 1) + 3 * BN + BM);
}

template <typename T, int DMAX, int BM, int BN, bool EXT>
__global__ void __launch_bounds__(NT) dq_kernel(BwdParams<T> P) {
  constexpr int MA = BM / 16, NB = BN / 16, NC = DMAX / 16, SQ = DMAX + 1, SP = BN + 1;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DMAX % 16 == 0, "tiles are multiples of 16");
  I2C_DYNAMIC_SMEM(smem);
  float* Qs = smem;            // BM x SQ
  float* Gs = Qs + BM * SQ;    // BM x SQ  (g_out)
  float* Ks = Gs + BM * SQ;    // BN x SQ
  float* Vs = Ks + BN * SQ;    // BN x SQ
  float* DSs = Vs + BN * SQ;   // BM x SP
  float* krow = DSs + BM * SP; // BN
  float* kcol = krow + BN;     // BN
  float* kdead = kcol + BN;    // BN (EXT)
  float* rlm = kdead + BN;     // BM: lmax of the tile's rows (EXT)

  const int L = P.L, H = P.H, cols = P.cols;
  const int nqt = (L + BM - 1) / BM;
  const Task task = decode(P.first, H, nqt, nqt);
  const BwdBranch<T> Bp = task.br == 0 ? P.br[0] : P.br[1];
  const int D = Bp.D, i0 = task.tile * BM, S = EXT ? Bp.S : L, nkt = (S + BN - 1) / BN;
  const gptr<const bool> drop = EXT ? mask_row(Bp.drop, Bp.drop_bs, task.b) : gptr<const bool>();
  const int64_t bh = int64_t(task.b) * H + task.h;  // row block of the (B, H, L) row vectors
  const int64_t bk = Bp.Bk == 1 ? 0 : task.b;       // key batch
  const gptr<const T> k = slab(Bp.k, Bp.sk, bk, task.h);
  const gptr<const T> v = slab(Bp.v, Bp.sv, bk, task.h);
  const gptr<const float> sigma = slab(Bp.sigma, Bp.ss, task.b, task.h);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const float scale = P.scale, eps = P.eps;

  load_tile<T, DMAX, BM>(Qs, slab(Bp.q, Bp.sq, task.b, task.h), Bp.sq.l, i0, L, D);
  load_tile<T, DMAX, BM>(Gs, slab(Bp.g_out, Bp.sgo, task.b, task.h), Bp.sgo.l, i0, L, D);

  Row rw[MA];
  float dfull[MA], g_kl_attn[MA], g_ent[MA];
  float W[MA], swy[MA], swx[MA], sty[MA], stx[MA], acc[MA][NC];
#pragma unroll
  for (int a = 0; a < MA; ++a) {
    const int i = min(i0 + ty + 16 * a, L - 1);  // padding rows compute on a real row, never written
    const int64_t r = bh * L + i;
    rw[a] = make_row<T>(i, cols, Bp.lse[r], sigma, Bp.ss.l, Bp.logz + bh * L);
    dfull[a] = Bp.dfull[r];
    g_kl_attn[a] = Bp.g_kl_attn[r];
    g_ent[a] = Bp.g_ent[r];
    W[a] = swy[a] = swx[a] = sty[a] = stx[a] = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[a][c] = 0.0f;
  }
  if (EXT)  // read after the __syncthreads that opens the key loop
    for (int ii = tid; ii < BM; ii += NT) rlm[ii] = Bp.lmax[bh * L + min(i0 + ii, L - 1)];

  for (int kt = 0; kt < nkt; ++kt) {
    const int j0 = kt * BN;
    __syncthreads();
    load_tile<T, DMAX, BN>(Ks, k, Bp.sk.l, j0, S, D);
    load_tile<T, DMAX, BN>(Vs, v, Bp.sv.l, j0, S, D);
    if (EXT)
      load_keys<BN>(krow, kcol, kdead, j0, cols, L, S, drop);
    else
      load_coords<BN>(krow, kcol, j0, cols);
    __syncthreads();
    float s[MA][NB], gv[MA][NB];
    tile_dot<DMAX, MA, NB>(s, Qs, Ks, ty, tx);
    tile_dot<DMAX, MA, NB>(gv, Gs, Vs, ty, tx);
#pragma unroll
    for (int a = 0; a < MA; ++a)
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const int jj = tx + 16 * b;
        float ds = 0.0f;
        if (EXT ? kdead[jj] == 0.0f : j0 + jj < L) {
          const Elem e = element<EXT>(scale * s[a][b], rw[a], krow[jj], kcol[jj], eps,
                                      EXT ? rlm[ty + 16 * a] : 0.0f);
          ds = i2c::ds_elem<float>(e.p, e.t, gv[a][b], dfull[a], g_kl_attn[a], g_ent[a], e.g);
          const float tw = i2c::tw_elem<float>(e.p, e.t, e.g);
          const float dy = rw[a].qr - krow[jj], dx = rw[a].qc - kcol[jj];
          const float dy2 = dy * dy, dx2 = dx * dx;
          W[a] += tw;
          swy[a] += tw * dy2;
          swx[a] += tw * dx2;
          sty[a] += e.t * dy2;
          stx[a] += e.t * dx2;
        }
        DSs[(ty + 16 * a) * SP + jj] = ds;
      }
    __syncthreads();
#pragma unroll 4
    for (int jj = 0; jj < BN; ++jj) {
      float kj[NC];
#pragma unroll
      for (int c = 0; c < NC; ++c) kj[c] = Ks[jj * SQ + tx + 16 * c];
#pragma unroll
      for (int a = 0; a < MA; ++a) {
        const float ds = DSs[(ty + 16 * a) * SP + jj];
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[a][c] = fmaf(ds, kj[c], acc[a][c]);
      }
    }
  }

#pragma unroll
  for (int a = 0; a < MA; ++a) {
    const float Wt = hsum16(W[a]), Swy = hsum16(swy[a]), Swx = hsum16(swx[a]), Sty = hsum16(sty[a]),
                Stx = hsum16(stx[a]);
    const int i = i0 + ty + 16 * a;
    if (i < L) {
      const int64_t r = bh * L + i;
      const gptr<T> dqrow = slab(Bp.dq, Bp.sdq, task.b, task.h) + i * Bp.sdq.l;
#pragma unroll
      for (int c = 0; c < NC; ++c)
        if (tx + 16 * c < D) dqrow[tx + 16 * c] = T(scale * acc[a][c]);
      if (tx == 0) {
        const float g_kl_prior = Bp.g_kl_prior[r];
        const float sy = to_f(sigma[i * Bp.ss.l]), sx = to_f(sigma[i * Bp.ss.l + 1]);
        const float ey = i2c::sigma_eff<float>(sy), ex = i2c::sigma_eff<float>(sx);
        const gptr<float> dsig = slab(Bp.dsigma, Bp.sds, task.b, task.h) + i * Bp.sds.l;
        dsig[0] = i2c::sigma_grad<float>(sy, i2c::dsigma_axis<float>(g_kl_prior, Swy, Wt, Sty, ey));
        dsig[1] = i2c::sigma_grad<float>(sx, i2c::dsigma_axis<float>(g_kl_prior, Swx, Wt, Stx, ex));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, key side: dk and dv. Tiles are transposed: thread (ty, tx) owns keys ty + 16 a
// and queries tx + 16 b of the score tile, and rows ty + 16 a of dk, dv.
// ---------------------------------------------------------------------------------------
template <int DMAX, int BM, int BN> constexpr size_t dkdv_smem() {
  return sizeof(float) * (2 * size_t(BM + BN) * (DMAX + 1) + 2 * size_t(BN) * (BM + 1) + 10 * BM + 3 * BN);
}

// (NT, 1): one resident block per SM is enough. Without the minimum, ptxas 13 for sm_80 caps the D = 128
// variant at 80 registers and spills 52 bytes; with it: 141 registers, no stack (sm_90 is unchanged).
template <typename T, int DMAX, int BM, int BN, bool EXT>
__global__ void __launch_bounds__(NT, 1) dkdv_kernel(BwdParams<T> P) {
  constexpr int KA = BN / 16, QB = BM / 16, NC = DMAX / 16, SQ = DMAX + 1, ST = BM + 1;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DMAX % 16 == 0, "tiles are multiples of 16");
  I2C_DYNAMIC_SMEM(smem);
  float* Ks = smem;             // BN x SQ
  float* Vs = Ks + BN * SQ;     // BN x SQ
  float* Qs = Vs + BN * SQ;     // BM x SQ
  float* Gs = Qs + BM * SQ;     // BM x SQ  (g_out)
  float* PT = Gs + BM * SQ;     // BN x ST  p, transposed
  float* DST = PT + BN * ST;    // BN x ST  ds, transposed
  float* rl = DST + BN * ST;    // per query row: lse, qr, qc, cy, cx, logz, dfull, g_kl_attn, g_ent
  float* rqr = rl + BM;
  float* rqc = rqr + BM;
  float* rcy = rqc + BM;
  float* rcx = rcy + BM;
  float* rlz = rcx + BM;
  float* rdf = rlz + BM;
  float* ra = rdf + BM;
  float* re = ra + BM;
  float* rlm = re + BM;         // lmax (EXT)
  float* krow = rlm + BM;       // BN
  float* kcol = krow + BN;      // BN
  float* kdead = kcol + BN;     // BN (EXT)

  const int L = P.L, H = P.H, B = P.B, cols = P.cols;
  const int nqt = (L + BM - 1) / BM;
  const int S0 = EXT ? P.br[0].S : L, S1 = EXT ? P.br[1].S : L;
  const Task task = decode(P.first, H, (S0 + BN - 1) / BN, (S1 + BN - 1) / BN);  // task.b is the key batch bk
  const BwdBranch<T> Bp = task.br == 0 ? P.br[0] : P.br[1];
  const int D = Bp.D, j0 = task.tile * BN, S = EXT ? Bp.S : L;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const float scale = P.scale, eps = P.eps;

  load_tile<T, DMAX, BN>(Ks, slab(Bp.k, Bp.sk, task.b, task.h), Bp.sk.l, j0, S, D);
  load_tile<T, DMAX, BN>(Vs, slab(Bp.v, Bp.sv, task.b, task.h), Bp.sv.l, j0, S, D);
  if (!EXT) load_coords<BN>(krow, kcol, j0, cols);

  float dk[KA][NC], dv[KA][NC];
#pragma unroll
  for (int a = 0; a < KA; ++a)
#pragma unroll
    for (int c = 0; c < NC; ++c) dk[a][c] = dv[a][c] = 0.0f;

  // A batch-shared memory sums over the whole batch, in order.
  const int b_lo = Bp.Bk == 1 ? 0 : task.b, b_hi = Bp.Bk == 1 ? B : task.b + 1;
  for (int b = b_lo; b < b_hi; ++b) {
    const int64_t bh = int64_t(b) * H + task.h;  // row block of the (B, H, L) row vectors
    const gptr<const T> q = slab(Bp.q, Bp.sq, b, task.h), g_out = slab(Bp.g_out, Bp.sgo, b, task.h);
    const gptr<const float> sigma = slab(Bp.sigma, Bp.ss, b, task.h);
    for (int qt = 0; qt < nqt; ++qt) {
      const int i0 = qt * BM;
      __syncthreads();  // the previous tiles are no longer read
      load_tile<T, DMAX, BM>(Qs, q, Bp.sq.l, i0, L, D);
      load_tile<T, DMAX, BM>(Gs, g_out, Bp.sgo.l, i0, L, D);
      if (EXT) load_keys<BN>(krow, kcol, kdead, j0, cols, L, S, mask_row(Bp.drop, Bp.drop_bs, b));  // per batch
      for (int ii = tid; ii < BM; ii += NT) {
        const int i = min(i0 + ii, L - 1);  // padding rows compute on a real row, masked below
        const int64_t r = bh * L + i;
        const Row rw = make_row<T>(i, cols, Bp.lse[r], sigma, Bp.ss.l, Bp.logz + bh * L);
        rlm[ii] = EXT ? Bp.lmax[r] : 0.0f;
        rl[ii] = rw.lse;
        rqr[ii] = rw.qr;
        rqc[ii] = rw.qc;
        rcy[ii] = rw.cy;
        rcx[ii] = rw.cx;
        rlz[ii] = rw.logz;
        rdf[ii] = Bp.dfull[r];
        ra[ii] = Bp.g_kl_attn[r];
        re[ii] = Bp.g_ent[r];
      }
      __syncthreads();
      float s[KA][QB], gv[KA][QB];
      tile_dot<DMAX, KA, QB>(s, Ks, Qs, ty, tx);  // fmaf(k, q, .) == fmaf(q, k, .): the scores of the forward
      tile_dot<DMAX, KA, QB>(gv, Vs, Gs, ty, tx);
#pragma unroll
      for (int a = 0; a < KA; ++a)
#pragma unroll
        for (int qb = 0; qb < QB; ++qb) {
          const int jj = ty + 16 * a, ii = tx + 16 * qb;
          float p = 0.0f, ds = 0.0f;
          if ((EXT ? kdead[jj] == 0.0f : j0 + jj < L) && i0 + ii < L) {
            const Row rw{rl[ii], rqr[ii], rqc[ii], rcy[ii], rcx[ii], rlz[ii]};
            const Elem e = element<EXT>(scale * s[a][qb], rw, krow[jj], kcol[jj], eps, rlm[ii]);
            p = e.p;
            ds = i2c::ds_elem<float>(e.p, e.t, gv[a][qb], rdf[ii], ra[ii], re[ii], e.g);
          }
          PT[jj * ST + ii] = p;
          DST[jj * ST + ii] = ds;
        }
      __syncthreads();
#pragma unroll 4
      for (int ii = 0; ii < BM; ++ii) {
        float qi[NC], gi[NC];
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          qi[c] = Qs[ii * SQ + tx + 16 * c];
          gi[c] = Gs[ii * SQ + tx + 16 * c];
        }
#pragma unroll
        for (int a = 0; a < KA; ++a) {
          const float p = PT[(ty + 16 * a) * ST + ii], ds = DST[(ty + 16 * a) * ST + ii];
#pragma unroll
          for (int c = 0; c < NC; ++c) {
            dv[a][c] = fmaf(p, gi[c], dv[a][c]);
            dk[a][c] = fmaf(ds, qi[c], dk[a][c]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int a = 0; a < KA; ++a) {
    const int j = j0 + ty + 16 * a;
    if (j < S) {
      const gptr<T> dkrow = slab(Bp.dk, Bp.sdk, task.b, task.h) + j * Bp.sdk.l;
      const gptr<T> dvrow = slab(Bp.dv, Bp.sdv, task.b, task.h) + j * Bp.sdv.l;
#pragma unroll
      for (int c = 0; c < NC; ++c)
        if (tx + 16 * c < D) {
          dkrow[tx + 16 * c] = T(scale * dk[a][c]);
          dvrow[tx + 16 * c] = T(dv[a][c]);
        }
    }
  }
}

}  // namespace i2c
