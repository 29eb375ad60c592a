// The forward kernels: out and lse (pass 1, online softmax), then K, E, R1, R2 where the statistics are needed
// (pass 2).
#pragma once

#include "cuda/common.cuh"

namespace i2c {

// ---------------------------------------------------------------------------------------
// Forward. EXT: an extended launch (key_padding_mask, S = n_img * L keys); the plain launches compile
// without that code.
// ---------------------------------------------------------------------------------------
// The forward's dynamic shared memory, in floats: the Q tile, the K-then-V tile, P, the key tile's grid
// coordinates and dead flags (EXT), the tile's rows' lmax (EXT). The kernel carves it and the launcher sizes it
// from these offsets.
template <int DMAX, int BM, int BN> struct FwdSmem {
  static constexpr int SQ = DMAX + 1, SP = BN + 1;
  static constexpr int Q = 0, KV = Q + BM * SQ, P = KV + BN * SQ, KROW = P + BM * SP, KCOL = KROW + BN,
                       KDEAD = KCOL + BN, RLM = KDEAD + BN, END = RLM + BM;
  static constexpr size_t bytes = sizeof(float) * size_t(END);
};

// The body of both forward kernels (below): the plain and the extended one differ in their launch bounds.
template <typename T, int DMAX, int BM, int BN, bool EXT>
__device__ __forceinline__ void fwd_block(const FwdParams<T>& P) {
  constexpr int MA = BM / 16, NB = BN / 16, NC = DMAX / 16, SQ = DMAX + 1, SP = BN + 1;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DMAX % 16 == 0, "tiles are multiples of 16");
  using Sm = FwdSmem<DMAX, BM, BN>;
  I2C_DYNAMIC_SMEM(smem);
  float *Qs = smem + Sm::Q, *KVs = smem + Sm::KV, *Ps = smem + Sm::P;  // KVs: K, then V of the current key tile
  float *krow = smem + Sm::KROW, *kcol = smem + Sm::KCOL, *kdead = smem + Sm::KDEAD, *rlm = smem + Sm::RLM;

  const int L = P.L, cols = P.cols;
  const QueryBlock<FwdBranch<T>, BM, BN, EXT> blk(P);
  const Task& task = blk.task;
  const FwdBranch<T>& Bp = blk.Bp;
  const int D = blk.D, i0 = blk.i0, S = blk.S, nkt = blk.nkt;
  const gptr<const bool> drop = blk.drop;
  const int64_t bh = blk.bh, bk = blk.bk;
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

}  // namespace i2c
