// Fused I2Correlation kernels for CUDA (spec sections 3-4): float32, bfloat16, float16 inputs.
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
// the strided reads hit distinct banks.
//
// Kernels:
//   logz_kernel  logZ_i of the separable prior, one thread per query row (O(rows + cols)).
//   fwd_kernel   per (branch, b, h, query tile): pass 1 over key tiles (online max/sum, out),
//                pass 2 (only where stats are needed): exact p and t, row sums K, E, R1, R2.
//   dq_kernel    per (branch, b, h, query tile): dq and the five prior row sums -> dsigma.
//   dkdv_kernel  per (branch, bk, h, key tile): dk, dv; loops over the query tiles and, for a
//                batch-shared memory (Bk = 1), over the batch in order: deterministic, no atomics.
// Both branches of a fused call run in the same launches (blocks of branch 0, then branch 1).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "i2corr_math.h"

namespace {

constexpr int NT = 256;      // threads per block
constexpr int MAX_BRANCH = 2;

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

// Rows [row0, row0 + R) of a contiguous (L, D) matrix into dst (R x (DMAX + 1) floats),
// zero-padded beyond L and beyond D.
template <typename T, int DMAX, int R>
__device__ __forceinline__ void load_tile(float* dst, const T* __restrict__ src, int row0, int L, int D) {
  for (int idx = threadIdx.x; idx < R * DMAX; idx += NT) {
    const int r = idx / DMAX, d = idx % DMAX, gr = row0 + r;
    dst[r * (DMAX + 1) + d] = (gr < L && d < D) ? to_f(src[int64_t(gr) * D + d]) : 0.0f;
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

// Per query row: what the element terms need.
struct Row {
  float lse, qr, qc, cy, cx, logz;
};

template <typename T>
__device__ __forceinline__ Row make_row(int i, int cols, float lse, const T* sigma, const float* logz) {
  Row r;
  r.lse = lse;
  r.qr = float(i / cols);
  r.qc = float(i % cols);
  r.cy = i2c::half_inv_sq<float>(to_f(sigma[2 * int64_t(i)]));
  r.cx = i2c::half_inv_sq<float>(to_f(sigma[2 * int64_t(i) + 1]));
  r.logz = logz[i];
  return r;
}

// Exact p and t of one element and their log terms.
struct Elem {
  float p, t;
  i2c::LogTerms<float> g;
};

__device__ __forceinline__ Elem element(float s, const Row& r, float kr, float kc, float eps) {
  Elem e;
  const float lp = s - r.lse;
  const float lt = i2c::axis_logw<float>(r.qr, kr, r.cy) + i2c::axis_logw<float>(r.qc, kc, r.cx) - r.logz;
  e.p = i2c::fast_exp<float>(lp);
  e.t = i2c::fast_exp<float>(lt);
  e.g = i2c::log_terms<float>(e.p, e.t, lp, lt, eps);
  return e;
}

// ---------------------------------------------------------------------------------------
// Parameters. Pointers are per branch; shapes (B, H, L, rows, cols) are shared.
// ---------------------------------------------------------------------------------------
template <typename T> struct FwdBranch {
  const T *q, *k, *v, *sigma;
  const float* logz;
  T* out;
  float *lse, *kl, *ent, *r1, *r2;
  int Bk, D;
  bool need;
};

template <typename T> struct FwdParams {
  FwdBranch<T> br[MAX_BRANCH];
  int64_t nbh[MAX_BRANCH];        // (batch, head) programs of each branch (0: no such branch)
  int64_t first[MAX_BRANCH + 1];  // block offsets of the branches, set by the launcher
  int B, H, L, cols;
  float scale, eps;
};

template <typename T> struct BwdBranch {
  const T *q, *k, *v, *sigma, *gout;
  const float *ga, *gb, *ge, *dfull, *lse, *logz;
  T *dq, *dk, *dv, *dsigma;
  int Bk, D;
};

template <typename T> struct BwdParams {
  BwdBranch<T> br[MAX_BRANCH];
  int64_t nbh[MAX_BRANCH];        // query side: B * H; key side: Bk * H (set per launch)
  int64_t first[MAX_BRANCH + 1];
  int B, H, L, cols;
  float scale, eps;
};

template <typename T> struct LogzParams {
  const T* sigma[MAX_BRANCH];
  float* logz[MAX_BRANCH];
  int64_t n;  // B * H * L per branch
  int nbranch, L, rows, cols;
};

// ---------------------------------------------------------------------------------------
// logZ_i = log sum_r exp(-(row_i - r)^2 / 2 sy^2) + log sum_c exp(-(col_i - c)^2 / 2 sx^2).
// ---------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(NT) logz_kernel(LogzParams<T> P) {
  const int64_t idx = int64_t(blockIdx.x) * NT + threadIdx.x;
  if (idx >= P.n * P.nbranch) return;
  const int br = idx >= P.n ? 1 : 0;
  const int64_t r = idx - br * P.n;
  const int i = int(r % P.L);
  const T* sg = (br == 0 ? P.sigma[0] : P.sigma[1]) + 2 * r;  // constant indices: no local-memory copy
  const float cy = i2c::half_inv_sq<float>(to_f(sg[0])), cx = i2c::half_inv_sq<float>(to_f(sg[1]));
  (br == 0 ? P.logz[0] : P.logz[1])[r] = i2c::axis_log_norm<float>(float(i / P.cols), cy, P.rows) +
                  i2c::axis_log_norm<float>(float(i % P.cols), cx, P.cols);
}

// Decode a flat block index into (branch, batch-or-bk, head, tile).
struct Task {
  int br, b, h, tile;
};

__device__ __forceinline__ Task decode(const int64_t* first, int H, int ntiles) {
  Task t;
  int64_t idx = blockIdx.x;
  t.br = idx >= first[1] ? 1 : 0;
  idx -= t.br ? first[1] : 0;
  t.tile = int(idx % ntiles);
  const int64_t bh = idx / ntiles;
  t.b = int(bh / H);
  t.h = int(bh % H);
  return t;
}

template <int DMAX, int BM, int BN> constexpr size_t fwd_smem() {
  return sizeof(float) * (size_t(BM + BN) * (DMAX + 1) + size_t(BM) * (BN + 1) + 2 * BN);
}

// ---------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------
template <typename T, int DMAX, int BM, int BN>
__global__ void __launch_bounds__(NT) fwd_kernel(FwdParams<T> P) {
  constexpr int MA = BM / 16, NB = BN / 16, NC = DMAX / 16, SQ = DMAX + 1, SP = BN + 1;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DMAX % 16 == 0, "tiles are multiples of 16");
  extern __shared__ float smem[];
  float* Qs = smem;            // BM x SQ
  float* KVs = Qs + BM * SQ;   // BN x SQ: K, then V of the current key tile
  float* Ps = KVs + BN * SQ;   // BM x SP
  float* krow = Ps + BM * SP;  // BN
  float* kcol = krow + BN;     // BN

  const int L = P.L, H = P.H, cols = P.cols;
  const int nqt = (L + BM - 1) / BM, nkt = (L + BN - 1) / BN;
  const Task task = decode(P.first, H, nqt);
  const FwdBranch<T> Bp = task.br == 0 ? P.br[0] : P.br[1];
  const int D = Bp.D, i0 = task.tile * BM;
  const int64_t bh = int64_t(task.b) * H + task.h;
  const int64_t bhk = int64_t(Bp.Bk == 1 ? 0 : task.b) * H + task.h;
  const T* q = Bp.q + bh * L * D;
  const T* k = Bp.k + bhk * L * D;
  const T* v = Bp.v + bhk * L * D;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const float scale = P.scale;

  load_tile<T, DMAX, BM>(Qs, q, i0, L, D);

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
    load_tile<T, DMAX, BN>(KVs, k, j0, L, D);
    __syncthreads();
    float s[MA][NB];
    tile_dot<DMAX, MA, NB>(s, Qs, KVs, ty, tx);
#pragma unroll
    for (int a = 0; a < MA; ++a)
#pragma unroll
      for (int b = 0; b < NB; ++b) s[a][b] = (j0 + tx + 16 * b < L) ? scale * s[a][b] : -INFINITY;
#pragma unroll
    for (int a = 0; a < MA; ++a) {
      float mx = s[a][0];
#pragma unroll
      for (int b = 1; b < NB; ++b) mx = fmaxf(mx, s[a][b]);
      mx = hmax16(mx);
      const float mnew = fmaxf(m[a], mx);  // finite: every key tile holds at least one key
      const float alpha = expf(m[a] - mnew);
      float sum = 0.0f;
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const float p = expf(s[a][b] - mnew);  // 0 for the masked keys
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
    load_tile<T, DMAX, BN>(KVs, v, j0, L, D);
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
      T* orow = Bp.out + (bh * L + i) * D;
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
    rw[a] = make_row<T>(i, cols, lse[a], Bp.sigma + bh * L * 2, Bp.logz + bh * L);
    kl[a] = en[a] = r1[a] = r2[a] = 0.0f;
  }
  for (int kt = 0; kt < nkt; ++kt) {
    const int j0 = kt * BN;
    __syncthreads();
    load_tile<T, DMAX, BN>(KVs, k, j0, L, D);
    load_coords<BN>(krow, kcol, j0, cols);
    __syncthreads();
    float s[MA][NB];
    tile_dot<DMAX, MA, NB>(s, Qs, KVs, ty, tx);
#pragma unroll
    for (int a = 0; a < MA; ++a)
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const int jj = tx + 16 * b;
        if (j0 + jj < L) {
          const Elem e = element(scale * s[a][b], rw[a], krow[jj], kcol[jj], P.eps);
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

// ---------------------------------------------------------------------------------------
// Backward, query side: dq and dsigma.
// ---------------------------------------------------------------------------------------
template <int DMAX, int BM, int BN> constexpr size_t dq_smem() {
  return sizeof(float) * (2 * size_t(BM + BN) * (DMAX + 1) + size_t(BM) * (BN + 1) + 2 * BN);
}

template <typename T, int DMAX, int BM, int BN>
__global__ void __launch_bounds__(NT) dq_kernel(BwdParams<T> P) {
  constexpr int MA = BM / 16, NB = BN / 16, NC = DMAX / 16, SQ = DMAX + 1, SP = BN + 1;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DMAX % 16 == 0, "tiles are multiples of 16");
  extern __shared__ float smem[];
  float* Qs = smem;            // BM x SQ
  float* Gs = Qs + BM * SQ;    // BM x SQ  (g_out)
  float* Ks = Gs + BM * SQ;    // BN x SQ
  float* Vs = Ks + BN * SQ;    // BN x SQ
  float* DSs = Vs + BN * SQ;   // BM x SP
  float* krow = DSs + BM * SP; // BN
  float* kcol = krow + BN;     // BN

  const int L = P.L, H = P.H, cols = P.cols;
  const int nqt = (L + BM - 1) / BM, nkt = (L + BN - 1) / BN;
  const Task task = decode(P.first, H, nqt);
  const BwdBranch<T> Bp = task.br == 0 ? P.br[0] : P.br[1];
  const int D = Bp.D, i0 = task.tile * BM;
  const int64_t bh = int64_t(task.b) * H + task.h;
  const int64_t bhk = int64_t(Bp.Bk == 1 ? 0 : task.b) * H + task.h;
  const T* k = Bp.k + bhk * L * D;
  const T* v = Bp.v + bhk * L * D;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const float scale = P.scale, eps = P.eps;

  load_tile<T, DMAX, BM>(Qs, Bp.q + bh * L * D, i0, L, D);
  load_tile<T, DMAX, BM>(Gs, Bp.gout + bh * L * D, i0, L, D);

  Row rw[MA];
  float dfull[MA], ga[MA], ge[MA];
  float W[MA], swy[MA], swx[MA], sty[MA], stx[MA], acc[MA][NC];
#pragma unroll
  for (int a = 0; a < MA; ++a) {
    const int i = min(i0 + ty + 16 * a, L - 1);  // padding rows compute on a real row, never written
    const int64_t r = bh * L + i;
    rw[a] = make_row<T>(i, cols, Bp.lse[r], Bp.sigma + bh * L * 2, Bp.logz + bh * L);
    dfull[a] = Bp.dfull[r];
    ga[a] = Bp.ga[r];
    ge[a] = Bp.ge[r];
    W[a] = swy[a] = swx[a] = sty[a] = stx[a] = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[a][c] = 0.0f;
  }

  for (int kt = 0; kt < nkt; ++kt) {
    const int j0 = kt * BN;
    __syncthreads();
    load_tile<T, DMAX, BN>(Ks, k, j0, L, D);
    load_tile<T, DMAX, BN>(Vs, v, j0, L, D);
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
        if (j0 + jj < L) {
          const Elem e = element(scale * s[a][b], rw[a], krow[jj], kcol[jj], eps);
          ds = i2c::ds_elem<float>(e.p, e.t, gv[a][b], dfull[a], ga[a], ge[a], e.g);
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
      T* dqrow = Bp.dq + r * D;
#pragma unroll
      for (int c = 0; c < NC; ++c)
        if (tx + 16 * c < D) dqrow[tx + 16 * c] = T(scale * acc[a][c]);
      if (tx == 0) {
        const float gb = Bp.gb[r];
        const float sy = to_f(Bp.sigma[2 * r]), sx = to_f(Bp.sigma[2 * r + 1]);
        Bp.dsigma[2 * r] = T(i2c::dsigma_axis<float>(gb, Swy, Wt, Sty, sy));
        Bp.dsigma[2 * r + 1] = T(i2c::dsigma_axis<float>(gb, Swx, Wt, Stx, sx));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, key side: dk and dv. Tiles are transposed: thread (ty, tx) owns keys ty + 16 a
// and queries tx + 16 b of the score tile, and rows ty + 16 a of dk, dv.
// ---------------------------------------------------------------------------------------
template <int DMAX, int BM, int BN> constexpr size_t dkdv_smem() {
  return sizeof(float) * (2 * size_t(BM + BN) * (DMAX + 1) + 2 * size_t(BN) * (BM + 1) + 9 * BM + 2 * BN);
}

template <typename T, int DMAX, int BM, int BN>
__global__ void __launch_bounds__(NT) dkdv_kernel(BwdParams<T> P) {
  constexpr int KA = BN / 16, QB = BM / 16, NC = DMAX / 16, SQ = DMAX + 1, ST = BM + 1;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DMAX % 16 == 0, "tiles are multiples of 16");
  extern __shared__ float smem[];
  float* Ks = smem;             // BN x SQ
  float* Vs = Ks + BN * SQ;     // BN x SQ
  float* Qs = Vs + BN * SQ;     // BM x SQ
  float* Gs = Qs + BM * SQ;     // BM x SQ  (g_out)
  float* PT = Gs + BM * SQ;     // BN x ST  p, transposed
  float* DST = PT + BN * ST;    // BN x ST  ds, transposed
  float* rl = DST + BN * ST;    // per query row of the tile: lse, qr, qc, cy, cx, logz, dfull, a, e
  float* rqr = rl + BM;
  float* rqc = rqr + BM;
  float* rcy = rqc + BM;
  float* rcx = rcy + BM;
  float* rlz = rcx + BM;
  float* rdf = rlz + BM;
  float* ra = rdf + BM;
  float* re = ra + BM;
  float* krow = re + BM;        // BN
  float* kcol = krow + BN;      // BN

  const int L = P.L, H = P.H, B = P.B, cols = P.cols;
  const int nqt = (L + BM - 1) / BM, nkt = (L + BN - 1) / BN;
  const Task task = decode(P.first, H, nkt);  // task.b is the key batch bk
  const BwdBranch<T> Bp = task.br == 0 ? P.br[0] : P.br[1];
  const int D = Bp.D, j0 = task.tile * BN;
  const int64_t bhk = int64_t(task.b) * H + task.h;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const float scale = P.scale, eps = P.eps;

  load_tile<T, DMAX, BN>(Ks, Bp.k + bhk * L * D, j0, L, D);
  load_tile<T, DMAX, BN>(Vs, Bp.v + bhk * L * D, j0, L, D);
  load_coords<BN>(krow, kcol, j0, cols);

  float dk[KA][NC], dv[KA][NC];
#pragma unroll
  for (int a = 0; a < KA; ++a)
#pragma unroll
    for (int c = 0; c < NC; ++c) dk[a][c] = dv[a][c] = 0.0f;

  // A batch-shared memory sums over the whole batch, in order.
  const int b_lo = Bp.Bk == 1 ? 0 : task.b, b_hi = Bp.Bk == 1 ? B : task.b + 1;
  for (int b = b_lo; b < b_hi; ++b) {
    const int64_t bh = int64_t(b) * H + task.h;
    for (int qt = 0; qt < nqt; ++qt) {
      const int i0 = qt * BM;
      __syncthreads();  // the previous tiles are no longer read
      load_tile<T, DMAX, BM>(Qs, Bp.q + bh * L * D, i0, L, D);
      load_tile<T, DMAX, BM>(Gs, Bp.gout + bh * L * D, i0, L, D);
      for (int ii = tid; ii < BM; ii += NT) {
        const int i = min(i0 + ii, L - 1);  // padding rows compute on a real row, masked below
        const int64_t r = bh * L + i;
        const Row rw = make_row<T>(i, cols, Bp.lse[r], Bp.sigma + bh * L * 2, Bp.logz + bh * L);
        rl[ii] = rw.lse;
        rqr[ii] = rw.qr;
        rqc[ii] = rw.qc;
        rcy[ii] = rw.cy;
        rcx[ii] = rw.cx;
        rlz[ii] = rw.logz;
        rdf[ii] = Bp.dfull[r];
        ra[ii] = Bp.ga[r];
        re[ii] = Bp.ge[r];
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
          if (j0 + jj < L && i0 + ii < L) {
            const Row rw{rl[ii], rqr[ii], rqc[ii], rcy[ii], rcx[ii], rlz[ii]};
            const Elem e = element(scale * s[a][qb], rw, krow[jj], kcol[jj], eps);
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
    if (j < L) {
      T* dkrow = Bp.dk + (bhk * L + j) * D;
      T* dvrow = Bp.dv + (bhk * L + j) * D;
#pragma unroll
      for (int c = 0; c < NC; ++c)
        if (tx + 16 * c < D) {
          dkrow[tx + 16 * c] = T(scale * dk[a][c]);
          dvrow[tx + 16 * c] = T(dv[a][c]);
        }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------
const char* kName = "fod_kernels cuda backend";

void set_smem(const void* kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// Blocks of branch 0 come first, then those of branch 1; returns the total.
template <typename Params>
unsigned set_first(Params& P, int L, int tile) {
  const int64_t ntiles = (L + tile - 1) / tile;
  P.first[0] = 0;
  for (int i = 0; i < MAX_BRANCH; ++i) P.first[i + 1] = P.first[i] + P.nbh[i] * ntiles;
  const int64_t total = P.first[MAX_BRANCH];
  TORCH_CHECK(total > 0 && total <= INT32_MAX, kName, ": a grid of ", total, " blocks is out of range");
  return unsigned(total);
}

template <typename T>
void launch_logz(const std::vector<at::Tensor>& sigmas, const std::vector<at::Tensor>& logz, int B, int H, int L,
                 int rows, int cols, cudaStream_t stream) {
  LogzParams<T> P{};
  P.nbranch = int(sigmas.size());
  P.n = int64_t(B) * H * L;
  P.L = L;
  P.rows = rows;
  P.cols = cols;
  for (int i = 0; i < P.nbranch; ++i) {
    P.sigma[i] = sigmas[i].data_ptr<T>();
    P.logz[i] = logz[i].data_ptr<float>();
  }
  const int64_t blocks = (P.n * P.nbranch + NT - 1) / NT;
  TORCH_CHECK(blocks <= INT32_MAX, kName, ": input too large");
  logz_kernel<T><<<unsigned(blocks), NT, 0, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int DMAX, int BM, int BN>
void launch_fwd(FwdParams<T> P, cudaStream_t stream) {
  constexpr size_t smem = fwd_smem<DMAX, BM, BN>();
  auto kernel = fwd_kernel<T, DMAX, BM, BN>;
  const unsigned blocks = set_first(P, P.L, BM);
  set_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<blocks, NT, smem, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int DMAX, int BM, int BN>
void launch_dq(BwdParams<T> P, const int64_t (&bks)[MAX_BRANCH], cudaStream_t stream) {
  constexpr size_t smem = dq_smem<DMAX, BM, BN>();
  auto kernel = dq_kernel<T, DMAX, BM, BN>;
  for (int i = 0; i < MAX_BRANCH; ++i) P.nbh[i] = bks[i] > 0 ? int64_t(P.B) * P.H : 0;  // one per (b, h)
  const unsigned blocks = set_first(P, P.L, BM);
  set_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<blocks, NT, smem, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int DMAX, int BM, int BN>
void launch_dkdv(BwdParams<T> P, const int64_t (&bks)[MAX_BRANCH], cudaStream_t stream) {
  constexpr size_t smem = dkdv_smem<DMAX, BM, BN>();
  auto kernel = dkdv_kernel<T, DMAX, BM, BN>;
  for (int i = 0; i < MAX_BRANCH; ++i) P.nbh[i] = bks[i] * P.H;  // one per (bk, h)
  // A batch-shared branch's blocks loop over the batch: schedule them first, so that the long
  // blocks do not form the tail. The kernel takes each branch from its slot, so a swap is safe.
  if (bks[1] == 1 && bks[0] > 1) {
    std::swap(P.br[0], P.br[1]);
    std::swap(P.nbh[0], P.nbh[1]);
  }
  const unsigned blocks = set_first(P, P.L, BN);
  set_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<blocks, NT, smem, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tile sizes per head-dim bucket (shared memory stays under the 163 KiB of an A100):
//   forward     BM = BN = 64                      (D <= 128: 83 KiB)
//   dq          BM = 64, BN = 64 (32 for D > 64)  (D <= 128: 108 KiB)
//   dkdv        BN = 64 (32 for D > 64), BM = 64  (D <= 128: 116 KiB)
int bucket(int D) {
  TORCH_CHECK(D >= 1 && D <= 128, kName, ": head dim D must be in 1..128, got ", D);
  return D <= 32 ? 32 : D <= 64 ? 64 : 128;
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.defined(), kName, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), kName, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), kName, ": ", name, " is on ", t.device(), " but q is on ", ref.device());
  TORCH_CHECK(t.is_contiguous(), kName, ": ", name, " must be contiguous");
}

void check_dtype(const at::Tensor& q) {
  const auto st = q.scalar_type();
  TORCH_CHECK(st != at::kDouble, kName, ": dtype float64 is not supported (it takes float32, bfloat16, float16); "
              "float64 runs on backend='reference' (any device) and backend='cpu' (CPU tensors)");
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, kName,
              ": dtype ", st, " is not supported (float32, bfloat16, float16 only)");
}

// Checks one branch; returns D.
int check_branch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& s,
                 const at::Tensor& q0, int64_t rows, int64_t cols) {
  check_tensor(q, "q", q0);
  check_tensor(k, "k", q0);
  check_tensor(v, "v", q0);
  check_tensor(s, "sigma", q0);
  check_dtype(q);
  for (const auto* t : {&k, &v, &s})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), kName, ": q, k, v, sigma must share a dtype, got ",
                q.scalar_type(), " and ", t->scalar_type());
  TORCH_CHECK(q.scalar_type() == q0.scalar_type(), kName, ": the branches differ in dtype (", q0.scalar_type(),
              " and ", q.scalar_type(), ")");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && s.dim() == 4, kName,
              ": q, k, v, sigma must be 4-D, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes(), ", ", s.sizes());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  TORCH_CHECK(q0.dim() == 4 && q0.size(0) == B && q0.size(1) == H && q0.size(2) == L, kName,
              ": the branches must share (B, H, L), got ", q0.sizes(), " and ", q.sizes());
  TORCH_CHECK(B > 0 && H > 0 && L > 0, kName, ": empty input, q has shape ", q.sizes());
  TORCH_CHECK((k.size(0) == 1 || k.size(0) == B) && k.size(1) == H && k.size(2) == L && k.size(3) == D, kName,
              ": k must be (1 or B, H, L, D) with q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), kName, ": v must match k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(s.size(0) == B && s.size(1) == H && s.size(2) == L && s.size(3) == 2, kName,
              ": sigma must be (B, H, L, 2) = (", B, ", ", H, ", ", L, ", 2), got ", s.sizes());
  TORCH_CHECK(rows > 0 && cols > 0 && rows * cols == L, kName, ": grid (", rows, ", ", cols,
              ") does not match L = ", L);
  TORCH_CHECK(B * H * L * std::max<int64_t>(D, 2) < (int64_t(1) << 40) && L < (int64_t(1) << 30), kName,
              ": input too large, q has shape ", q.sizes());
  return bucket(int(D));
}

template <typename T>
void fwd_dispatch(const FwdParams<T>& P, int dmax, cudaStream_t stream) {
  switch (dmax) {
    case 32: launch_fwd<T, 32, 64, 64>(P, stream); break;
    case 64: launch_fwd<T, 64, 64, 64>(P, stream); break;
    default: launch_fwd<T, 128, 64, 64>(P, stream); break;
  }
}

template <typename T>
void bwd_dispatch(const BwdParams<T>& P, const int64_t (&bks)[MAX_BRANCH], int dmax, cudaStream_t stream) {
  switch (dmax) {
    case 32:
      launch_dq<T, 32, 64, 64>(P, bks, stream);
      launch_dkdv<T, 32, 64, 64>(P, bks, stream);
      break;
    case 64:
      launch_dq<T, 64, 64, 64>(P, bks, stream);
      launch_dkdv<T, 64, 64, 64>(P, bks, stream);
      break;
    default:
      launch_dq<T, 128, 64, 32>(P, bks, stream);
      launch_dkdv<T, 128, 64, 32>(P, bks, stream);
      break;
  }
}

template <typename T> T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

template <typename T>
void forward_impl(const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
                  const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& sigmas,
                  const std::vector<at::Tensor>& logz, std::vector<at::Tensor>& res, int rows, int cols,
                  float scale, float eps, const std::vector<bool>& need, int dmax) {
  const int n = int(qs.size());
  const int B = int(qs[0].size(0)), H = int(qs[0].size(1)), L = int(qs[0].size(2));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bool any = false;
  for (bool x : need) any = any || x;
  if (any) {
    launch_logz<T>(sigmas, logz, B, H, L, rows, cols, stream);
  }
  FwdParams<T> P{};
  P.B = B;
  P.H = H;
  P.L = L;
  P.cols = cols;
  P.scale = scale;
  P.eps = eps;
  for (int i = 0; i < n; ++i) {
    P.nbh[i] = int64_t(B) * H;
    auto& b = P.br[i];
    b.q = ptr<const T>(qs[i]);
    b.k = ptr<const T>(ks[i]);
    b.v = ptr<const T>(vs[i]);
    b.sigma = ptr<const T>(sigmas[i]);
    b.logz = logz[i].data_ptr<float>();
    b.out = ptr<T>(res[6 * i]);
    b.lse = res[6 * i + 1].data_ptr<float>();
    b.need = need[i];
    b.kl = need[i] ? res[6 * i + 2].data_ptr<float>() : nullptr;
    b.ent = need[i] ? res[6 * i + 3].data_ptr<float>() : nullptr;
    b.r1 = need[i] ? res[6 * i + 4].data_ptr<float>() : nullptr;
    b.r2 = need[i] ? res[6 * i + 5].data_ptr<float>() : nullptr;
    b.Bk = int(ks[i].size(0));
    b.D = int(qs[i].size(3));
  }
  fwd_dispatch<T>(P, dmax, stream);
}

}  // namespace

std::vector<at::Tensor> i2corr_cuda_forward(const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
                                            const std::vector<at::Tensor>& vs,
                                            const std::vector<at::Tensor>& sigmas, int64_t rows, int64_t cols,
                                            double scale, double eps, const std::vector<bool>& need_stats) {
  const size_t n = qs.size();
  TORCH_CHECK(n >= 1 && n <= MAX_BRANCH, kName, ": 1 or 2 branches, got ", n);
  TORCH_CHECK(ks.size() == n && vs.size() == n && sigmas.size() == n && need_stats.size() == n, kName,
              ": branch lists differ in length");
  TORCH_CHECK(scale > 0 && std::isfinite(scale), kName, ": scale must be positive and finite, got ", scale);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), kName, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(qs[0].defined() && qs[0].is_cuda(), kName, ": q must be a CUDA tensor");
  int dmax = 32;
  for (size_t i = 0; i < n; ++i) dmax = std::max(dmax, check_branch(qs[i], ks[i], vs[i], sigmas[i], qs[0], rows, cols));
  const c10::cuda::CUDAGuard guard(qs[0].device());
  const auto& q0 = qs[0];
  const int64_t B = q0.size(0), H = q0.size(1), L = q0.size(2);
  auto fopt = q0.options().dtype(at::kFloat);
  std::vector<at::Tensor> res, logz;
  for (size_t i = 0; i < n; ++i) {
    res.push_back(at::empty_like(qs[i]));
    res.push_back(at::empty({B, H, L}, fopt));
    for (int s = 0; s < 4; ++s) res.push_back(need_stats[i] ? at::empty({B, H, L}, fopt) : at::empty({0}, fopt));
    logz.push_back(at::empty({B, H, L}, fopt));
  }
  switch (q0.scalar_type()) {
    case at::kFloat:
      forward_impl<float>(qs, ks, vs, sigmas, logz, res, int(rows), int(cols), float(scale), float(eps), need_stats, dmax);
      break;
    case at::kBFloat16:
      forward_impl<at::BFloat16>(qs, ks, vs, sigmas, logz, res, int(rows), int(cols), float(scale), float(eps),
                                 need_stats, dmax);
      break;
    default:
      forward_impl<at::Half>(qs, ks, vs, sigmas, logz, res, int(rows), int(cols), float(scale), float(eps), need_stats,
                             dmax);
      break;
  }
  return res;
}

namespace {

template <typename T>
void backward_impl(const std::vector<at::Tensor>& gs, const std::vector<at::Tensor>& as,
                   const std::vector<at::Tensor>& bs, const std::vector<at::Tensor>& es,
                   const std::vector<at::Tensor>& dfs, const std::vector<at::Tensor>& qs,
                   const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs,
                   const std::vector<at::Tensor>& sigmas, const std::vector<at::Tensor>& lses,
                   const std::vector<at::Tensor>& logz, std::vector<at::Tensor>& res, int rows, int cols, float scale,
                   float eps, int dmax) {
  const int n = int(qs.size());
  const int B = int(qs[0].size(0)), H = int(qs[0].size(1)), L = int(qs[0].size(2));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_logz<T>(sigmas, logz, B, H, L, rows, cols, stream);
  BwdParams<T> P{};
  P.B = B;
  P.H = H;
  P.L = L;
  P.cols = cols;
  P.scale = scale;
  P.eps = eps;
  int64_t bks[MAX_BRANCH] = {0, 0};  // key batch of each branch, 0: no such branch
  for (int i = 0; i < n; ++i) {
    auto& b = P.br[i];
    b.q = ptr<const T>(qs[i]);
    b.k = ptr<const T>(ks[i]);
    b.v = ptr<const T>(vs[i]);
    b.sigma = ptr<const T>(sigmas[i]);
    b.gout = ptr<const T>(gs[i]);
    b.ga = as[i].data_ptr<float>();
    b.gb = bs[i].data_ptr<float>();
    b.ge = es[i].data_ptr<float>();
    b.dfull = dfs[i].data_ptr<float>();
    b.lse = lses[i].data_ptr<float>();
    b.logz = logz[i].data_ptr<float>();
    b.dq = ptr<T>(res[4 * i]);
    b.dk = ptr<T>(res[4 * i + 1]);
    b.dv = ptr<T>(res[4 * i + 2]);
    b.dsigma = ptr<T>(res[4 * i + 3]);
    b.Bk = int(ks[i].size(0));
    b.D = int(qs[i].size(3));
    bks[i] = ks[i].size(0);
  }
  bwd_dispatch<T>(P, bks, dmax, stream);
}

}  // namespace

std::vector<at::Tensor> i2corr_cuda_backward(
    const std::vector<at::Tensor>& g_outs, const std::vector<at::Tensor>& g_kla, const std::vector<at::Tensor>& g_klp,
    const std::vector<at::Tensor>& g_ents, const std::vector<at::Tensor>& dfulls, const std::vector<at::Tensor>& qs,
    const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& sigmas,
    const std::vector<at::Tensor>& lses, int64_t rows, int64_t cols, double scale, double eps) {
  const size_t n = qs.size();
  TORCH_CHECK(n >= 1 && n <= MAX_BRANCH, kName, ": 1 or 2 branches, got ", n);
  TORCH_CHECK(g_outs.size() == n && g_kla.size() == n && g_klp.size() == n && g_ents.size() == n &&
                  dfulls.size() == n && ks.size() == n && vs.size() == n && sigmas.size() == n && lses.size() == n,
              kName, ": branch lists differ in length");
  TORCH_CHECK(scale > 0 && std::isfinite(scale), kName, ": scale must be positive and finite, got ", scale);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), kName, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(qs[0].defined() && qs[0].is_cuda(), kName, ": q must be a CUDA tensor");
  int dmax = 32;
  for (size_t i = 0; i < n; ++i) {
    const auto& q = qs[i];
    dmax = std::max(dmax, check_branch(q, ks[i], vs[i], sigmas[i], qs[0], rows, cols));
    check_tensor(g_outs[i], "grad_out", q);
    TORCH_CHECK(g_outs[i].sizes() == q.sizes() && g_outs[i].scalar_type() == q.scalar_type(), kName,
                ": grad_out must match q (", q.sizes(), ", ", q.scalar_type(), "), got ", g_outs[i].sizes(), ", ",
                g_outs[i].scalar_type());
    const std::pair<const at::Tensor*, const char*> stats[] = {
        {&g_kla[i], "grad kl_attn"}, {&g_klp[i], "grad kl_prior"}, {&g_ents[i], "grad entropy"},
        {&dfulls[i], "dfull"}, {&lses[i], "lse"}};
    for (const auto& st : stats) {
      const at::Tensor& t = *st.first;
      check_tensor(t, st.second, q);
      TORCH_CHECK(t.scalar_type() == at::kFloat, kName, ": ", st.second, " must be float32, got ", t.scalar_type());
      TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == q.size(2), kName,
                  ": ", st.second, " must be (B, H, L) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ",
                  t.sizes());
    }
  }
  const c10::cuda::CUDAGuard guard(qs[0].device());
  const auto& q0 = qs[0];
  auto fopt = q0.options().dtype(at::kFloat);
  std::vector<at::Tensor> res, logz;
  for (size_t i = 0; i < n; ++i) {
    res.push_back(at::empty_like(qs[i]));
    res.push_back(at::empty_like(ks[i]));
    res.push_back(at::empty_like(vs[i]));
    res.push_back(at::empty_like(sigmas[i]));
    logz.push_back(at::empty({q0.size(0), q0.size(1), q0.size(2)}, fopt));
  }
  const int r = int(rows), c = int(cols);
  const float sc = float(scale), ep = float(eps);
  switch (q0.scalar_type()) {
    case at::kFloat:
      backward_impl<float>(g_outs, g_kla, g_klp, g_ents, dfulls, qs, ks, vs, sigmas, lses, logz, res, r, c, sc, ep, dmax);
      break;
    case at::kBFloat16:
      backward_impl<at::BFloat16>(g_outs, g_kla, g_klp, g_ents, dfulls, qs, ks, vs, sigmas, lses, logz, res, r, c, sc,
                                  ep, dmax);
      break;
    default:
      backward_impl<at::Half>(g_outs, g_kla, g_klp, g_ents, dfulls, qs, ks, vs, sigmas, lses, logz, res, r, c, sc, ep,
                              dmax);
      break;
  }
  return res;
}
