// The backward kernels: dq and dsigma (query side), dk and dv (key side).
#pragma once

#include "cuda/common.cuh"

namespace i2c {

// ---------------------------------------------------------------------------------------
// Backward, query side: dq and dsigma.
// ---------------------------------------------------------------------------------------
// The dq kernel's dynamic shared memory, in floats: the Q, g_out, K and V tiles, dS, the key tile's grid
// coordinates and dead flags (EXT), the tile's rows' lmax (EXT).
template <int DMAX, int BM, int BN> struct DqSmem {
  static constexpr int SQ = DMAX + 1, SP = BN + 1;
  static constexpr int Q = 0, G = Q + BM * SQ, K = G + BM * SQ, V = K + BN * SQ, DS = V + BN * SQ,
                       KROW = DS + BM * SP, KCOL = KROW + BN, KDEAD = KCOL + BN, RLM = KDEAD + BN, END = RLM + BM;
  static constexpr size_t bytes = sizeof(float) * size_t(END);
};

template <typename T, int DMAX, int BM, int BN, bool EXT>
__global__ void __launch_bounds__(NT) dq_kernel(BwdParams<T> P) {
  constexpr int MA = BM / 16, NB = BN / 16, NC = DMAX / 16, SQ = DMAX + 1, SP = BN + 1;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DMAX % 16 == 0, "tiles are multiples of 16");
  using Sm = DqSmem<DMAX, BM, BN>;
  I2C_DYNAMIC_SMEM(smem);
  float *Qs = smem + Sm::Q, *Gs = smem + Sm::G, *Ks = smem + Sm::K, *Vs = smem + Sm::V, *DSs = smem + Sm::DS;
  float *krow = smem + Sm::KROW, *kcol = smem + Sm::KCOL, *kdead = smem + Sm::KDEAD, *rlm = smem + Sm::RLM;

  const int L = P.L, cols = P.cols;
  const QueryBlock<BwdBranch<T>, BM, BN, EXT> blk(P);
  const Task& task = blk.task;
  const BwdBranch<T>& Bp = blk.Bp;
  const int D = blk.D, i0 = blk.i0, S = blk.S, nkt = blk.nkt;
  const gptr<const bool> drop = blk.drop;
  const int64_t bh = blk.bh, bk = blk.bk;
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
// The dkdv kernel's dynamic shared memory, in floats: the K, V, Q and g_out tiles, p and dS transposed, ten
// per-query-row vectors (ROWS: lse, qr, qc, cy, cx, logz, dfull, g_kl_attn, g_ent, lmax), the key tile's grid
// coordinates and dead flags (EXT).
template <int DMAX, int BM, int BN> struct DkdvSmem {
  static constexpr int SQ = DMAX + 1, ST = BM + 1;
  static constexpr int K = 0, V = K + BN * SQ, Q = V + BN * SQ, G = Q + BM * SQ, PT = G + BM * SQ,
                       DST = PT + BN * ST, ROWS = DST + BN * ST, KROW = ROWS + 10 * BM, KCOL = KROW + BN,
                       KDEAD = KCOL + BN, END = KDEAD + BN;
  static constexpr size_t bytes = sizeof(float) * size_t(END);
};

// (NT, 1): one resident block per SM is enough. Without the minimum, ptxas 13 for sm_80 caps the D = 128
// variant at 80 registers and spills 52 bytes; with it: 141 registers, no stack (sm_90 is unchanged).
template <typename T, int DMAX, int BM, int BN, bool EXT>
__global__ void __launch_bounds__(NT, 1) dkdv_kernel(BwdParams<T> P) {
  constexpr int KA = BN / 16, QB = BM / 16, NC = DMAX / 16, SQ = DMAX + 1, ST = BM + 1;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DMAX % 16 == 0, "tiles are multiples of 16");
  using Sm = DkdvSmem<DMAX, BM, BN>;
  I2C_DYNAMIC_SMEM(smem);
  float *Ks = smem + Sm::K, *Vs = smem + Sm::V, *Qs = smem + Sm::Q, *Gs = smem + Sm::G;
  float *PT = smem + Sm::PT, *DST = smem + Sm::DST;  // p and ds, transposed
  float* rl = smem + Sm::ROWS;  // per query row: lse, qr, qc, cy, cx, logz, dfull, g_kl_attn, g_ent, lmax
  float* rqr = rl + BM;
  float* rqc = rqr + BM;
  float* rcy = rqc + BM;
  float* rcx = rcy + BM;
  float* rlz = rcx + BM;
  float* rdf = rlz + BM;
  float* ra = rdf + BM;
  float* re = ra + BM;
  float* rlm = re + BM;         // lmax (EXT)
  float *krow = smem + Sm::KROW, *kcol = smem + Sm::KCOL, *kdead = smem + Sm::KDEAD;

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
