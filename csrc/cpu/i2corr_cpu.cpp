// Fused I2Correlation kernels for the CPU (float32 and float64).
//
// Forward: per (branch, batch, head, block of BM query rows) one task computes
// the block's scores against all keys (a BM x S scratch, never L x L), the
// exact softmax row (the whole row is at hand, so no online rescaling is
// needed), out = P V, and, when asked, the row statistics K, E, R1, R2.
// Backward: per (branch, key batch, head) one task sweeps the queries that use
// those keys (all batches when the memory is batch-shared), recomputing p and
// t from the saved lse, and accumulates dk, dv in a fixed order
// (deterministic, no atomics) while it writes dq and dsigma of its rows.
// Matrix products use the register-blocked micro-kernels of cpu/gemm.h on
// head-dim-padded copies; the per-element maths is csrc/i2corr_math.h, shared
// with the CUDA kernels.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <string>
#include <vector>

#include "cpu/gemm.h"
#include "i2corr_math.h"

namespace {

constexpr int64_t BM = 32;  // query rows per forward task / per backward block

// Runs f(task) for task in [0, n) on ATen's thread pool with dynamic scheduling
// (tasks differ in cost: a shared memory's backward task sweeps the whole batch).
template <class F>
void run_tasks(int64_t n, const F& f) {
  if (n <= 0) return;
  int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < n; t = next++) f(t);
  });
}

// One branch's inputs. qp, kp, vp, gp: head dim zero-padded to Dp; kT, vT: (Dp, Sp)
// transposes of k, v, zero-padded. Sp, Dp are multiples of i2cpu::NJ. k, v hold S = n_img * L
// keys (n_img images on the queries' grid). drop: the key_padding_mask ((1 or B, S), True = the
// key is ignored; batch stride drop_bs, 0 when shared), or null.
template <typename T>
struct Branch {
  const T *qp, *kp, *vp, *kT, *vT, *gp, *sigma;
  const bool* drop;
  int64_t B, Bk, H, L, D, S, Sp, Dp, n_img, drop_bs;
};

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// std::max(a, b) for the max reductions of `#pragma omp simd` loops: std::max returns a reference, which
// makes the reduction variable addressable, and GCC then compiles the loop as a serial chain of scalar maxss
// (4 cycles per key: the forward's row max took a third of forward_task's time). Same value as std::max.
template <typename T>
inline T vmax(T a, T b) {
  return a < b ? b : a;
}

// Per-thread scratch, reused by every task the thread runs (no allocation in the hot path): slot k of
// at least n elements, contents unspecified (callers fill what they read).
template <typename T>
T* scratch(int k, size_t n) {
  thread_local std::vector<T> bufs[8];
  if (bufs[k].size() < n) bufs[k].resize(n);
  return bufs[k].data();
}

// (.., L, D) -> (.., L, Dp) zero-padded, contiguous.
at::Tensor pad_d(const at::Tensor& t, int64_t Dp) {
  return (t.size(-1) == Dp ? t : at::constant_pad_nd(t, {0, Dp - t.size(-1)})).contiguous();
}

// (.., S, D) -> (.., Dp, Sp): transposed, zero-padded, contiguous.
at::Tensor pad_t(const at::Tensor& t, int64_t Sp, int64_t Dp) {
  return at::constant_pad_nd(t.transpose(-1, -2), {0, Sp - t.size(-2), 0, Dp - t.size(-1)}).contiguous();
}

// Per-row prior tables. Without a mask (set): t_ij = ty[row_j] * tx[col_j], log t_ij = lty[row_j] +
// ltx[col_j], each image weighing 1/n_img (folded into ty, lty). With a mask (set_masked): lty, ltx are
// the unnormalised log-weights -d^2 / (2 s^2), lmax the largest l = lty + ltx of an unmasked key and lsum =
// log sum exp(l - lmax) over them (the prior is not separable then): log t_ij = (l_ij - lmax) - lsum, in that
// order, as log_softmax. Folding lmax + lsum into one logZ first would cost ulp(|l|) in every log t: with a
// masked own position and widths ~1e-5 tokens |l| ~ 1e9, which in float32 is a rounding of 64.
template <typename T>
struct PriorRow {
  std::vector<T> ty, lty, tx, ltx, dy2, dx2;
  T sum_t_dy2 = 0, sum_t_dx2 = 0, ry = 0, cx = 0, lmax = 0, lsum = 0;
  PriorRow(int rows, int cols) { resize(rows, cols); }
  void resize(int rows, int cols) {
    for (auto* v : {&ty, &lty, &dy2}) v->resize(rows);
    for (auto* v : {&tx, &ltx, &dx2}) v->resize(cols);
  }

  void set(int64_t i, T sy, T sx, int rows, int cols, int64_t n_img) {
    ry = T(i / cols);
    cx = T(i % cols);
    const T cy = i2c::half_inv_sq<T>(sy), cxx = i2c::half_inv_sq<T>(sx);
    const T lzy = i2c::axis_log_norm<T>(ry, cy, rows), lzx = i2c::axis_log_norm<T>(cx, cxx, cols);
    sum_t_dy2 = 0;
    sum_t_dx2 = 0;
    for (int r = 0; r < rows; ++r) {
      lty[r] = i2c::axis_logw<T>(ry, T(r), cy) - lzy;
      ty[r] = i2c::fast_exp<T>(lty[r]);
      dy2[r] = (ry - T(r)) * (ry - T(r));
      sum_t_dy2 += ty[r] * dy2[r];
    }
    for (int c = 0; c < cols; ++c) {
      ltx[c] = i2c::axis_logw<T>(cx, T(c), cxx) - lzx;
      tx[c] = i2c::fast_exp<T>(ltx[c]);
      dx2[c] = (cx - T(c)) * (cx - T(c));
      sum_t_dx2 += tx[c] * dx2[c];
    }
    if (n_img > 1) {  // the sums above are those of all S keys already (n_img copies of weight 1/n_img)
      const T lm = i2c::fast_log<T>(T(n_img));
      for (int r = 0; r < rows; ++r) {
        lty[r] -= lm;
        ty[r] = i2c::fast_exp<T>(lty[r]);
      }
    }
  }

  void set_masked(int64_t i, T sy, T sx, int rows, int cols, int64_t n_img, const bool* drop) {
    ry = T(i / cols);
    cx = T(i % cols);
    const T cy = i2c::half_inv_sq<T>(sy), cxx = i2c::half_inv_sq<T>(sx);
    for (int r = 0; r < rows; ++r) {
      lty[r] = i2c::axis_logw<T>(ry, T(r), cy);
      dy2[r] = (ry - T(r)) * (ry - T(r));
    }
    for (int c = 0; c < cols; ++c) {
      ltx[c] = i2c::axis_logw<T>(cx, T(c), cxx);
      dx2[c] = (cx - T(c)) * (cx - T(c));
    }
    // lmax and lsum over the unmasked keys: the max of l = lty + ltx, then log of the shifted sum.
    const T ninf = -std::numeric_limits<T>::infinity();
    T m = ninf;
    for (int64_t img = 0; img < n_img; ++img)
      for (int r = 0; r < rows; ++r) {
        const bool* dr = drop + (img * rows + r) * cols;
        const T lr = lty[r];
#pragma omp simd reduction(max : m)
        for (int c = 0; c < cols; ++c) m = vmax(m, dr[c] ? ninf : lr + ltx[c]);
      }
    T z = 0;
    for (int64_t img = 0; img < n_img; ++img)
      for (int r = 0; r < rows; ++r) {
        const bool* dr = drop + (img * rows + r) * cols;
        const T lr = lty[r] - m;
#pragma omp simd reduction(+ : z)
        for (int c = 0; c < cols; ++c) z += dr[c] ? T(0) : i2c::fast_exp<T>(lr + ltx[c]);
      }
    lmax = m;
    lsum = i2c::fast_log<T>(z);  // a fully masked row: m = lsum = -inf, so log t is NaN, as the reference's
  }
};

// Per-column accumulators of a query row's sums (n of them, cols each, zeroed): the row loops below add each
// grid row's terms into them column by column and reduce them once per query row. An `omp simd reduction` in
// the cols-long inner loop instead ended every grid row with a serial sum of its vector lanes (GCC combines the
// lanes one by one): 2-4 chains of 16 dependent adds per 32 keys, a large share of the row loops' time.
template <typename T>
T* col_acc(int n, int cols) {
  T* a = scratch<T>(7, size_t(n) * cols);
  std::fill_n(a, size_t(n) * cols, T(0));
  return a;
}

template <typename T>
T col_sum(const T* a, int cols) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int c = 0; c < cols; ++c) s += a[c];
  return s;
}

template <typename T, bool HasEps>
void row_stats(const T* srow, const T* prow, T lse, const PriorRow<T>& pr, int rows, int cols, int64_t n_img,
               T eps, T* kl, T* ent, T* r1, T* r2) {
  T* acc = col_acc<T>(4, cols);
  T *akl = acc, *aent = acc + cols, *ar1 = acc + 2 * cols, *ar2 = acc + 3 * cols;
  const int64_t L = int64_t(rows) * cols;
  for (int64_t img = 0; img < n_img; ++img)
    for (int r = 0; r < rows; ++r) {
      const T tyr = pr.ty[r], ltyr = pr.lty[r];
      const T* sr = srow + img * L + int64_t(r) * cols;
      const T* pp = prow + img * L + int64_t(r) * cols;
#pragma omp simd
      for (int c = 0; c < cols; ++c) {
        const T p = pp[c], t = tyr * pr.tx[c];
        const auto g = i2c::log_terms_t<HasEps, T>(p, t, sr[c] - lse, ltyr + pr.ltx[c], eps);
        akl[c] += i2c::kl_elem<T>(p, t, g);
        aent[c] += i2c::ent_elem<T>(p, g);
        ar1[c] += i2c::r1_elem<T>(p, t, g);
        ar2[c] += i2c::r2_elem<T>(p, g);
      }
    }
  *kl = col_sum<T>(akl, cols);
  *ent = col_sum<T>(aent, cols);
  *r1 = col_sum<T>(ar1, cols);
  *r2 = col_sum<T>(ar2, cols);
}

// row_stats of a masked row: t = exp((l - lmax) - lsum) per element; the masked keys (p = t = 0) add nothing.
template <typename T, bool HasEps>
void row_stats_masked(const T* srow, const T* prow, T lse, const PriorRow<T>& pr, int rows, int cols,
                      int64_t n_img, const bool* drop, T eps, T* kl, T* ent, T* r1, T* r2) {
  T skl = 0, sent = 0, sr1 = 0, sr2 = 0;
  const int64_t L = int64_t(rows) * cols;
  for (int64_t img = 0; img < n_img; ++img)
    for (int r = 0; r < rows; ++r) {
      const T lr = pr.lty[r];
      const int64_t base = img * L + int64_t(r) * cols;
      const T *sr = srow + base, *pp = prow + base;
      const bool* dr = drop + base;
#pragma omp simd reduction(+ : skl, sent, sr1, sr2)
      for (int c = 0; c < cols; ++c) {
        const T p = pp[c], lt = (lr + pr.ltx[c] - pr.lmax) - pr.lsum;
        const T t = dr[c] ? T(0) : i2c::fast_exp<T>(lt);
        const auto g = i2c::log_terms_t<HasEps, T>(p, t, sr[c] - lse, lt, eps);
        skl += dr[c] ? T(0) : i2c::kl_elem<T>(p, t, g);
        sent += dr[c] ? T(0) : i2c::ent_elem<T>(p, g);
        sr1 += dr[c] ? T(0) : i2c::r1_elem<T>(p, t, g);
        sr2 += dr[c] ? T(0) : i2c::r2_elem<T>(p, g);
      }
    }
  *kl = skl;
  *ent = sent;
  *r1 = sr1;
  *r2 = sr2;
}

// Scores of masked keys -> -inf: they get p = 0 in the softmax (and a fully masked row NaN).
template <typename T>
void mask_scores(T* srow, const bool* drop, int64_t S) {
  const T ninf = -std::numeric_limits<T>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < S; ++j) srow[j] = drop[j] ? ninf : srow[j];
}

template <typename T>
void forward_task(const Branch<T>& br, int rows, int cols, T scale, T eps, bool stats, int64_t b, int64_t h,
                  int64_t i0, T* out, T* lse, T* kl, T* ent, T* r1, T* r2) {
  const int64_t L = br.L, D = br.D, H = br.H, S = br.S, Sp = br.Sp, Dp = br.Dp;
  const int64_t nb = std::min(BM, L - i0);
  const int64_t kb = br.Bk == 1 ? 0 : b;
  const T* Q = br.qp + (b * H + h) * L * Dp;
  const T* KT = br.kT + (kb * H + h) * Dp * Sp;
  const T* V = br.vp + (kb * H + h) * S * Dp;
  const T* SG = br.sigma + (b * H + h) * L * 2;
  const bool* drop = br.drop ? br.drop + b * br.drop_bs : nullptr;
  const int64_t row0 = (b * H + h) * L;
  T *Sc = scratch<T>(0, nb * Sp), *P = scratch<T>(1, nb * Sp), *O = scratch<T>(2, nb * Dp);
  thread_local PriorRow<T> pr(0, 0);
  pr.resize(rows, cols);
  i2cpu::gemm_abt<T>(nb, Sp, Dp, scale, Q + i0 * Dp, KT, Sc);  // Sc = scale Q K^T
  for (int64_t ii = 0; ii < nb; ++ii) {
    const int64_t i = i0 + ii, x = row0 + i;
    T* srow = Sc + ii * Sp;
    T* prow = P + ii * Sp;
    if (drop) mask_scores<T>(srow, drop, S);
    T m = srow[0];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < S; ++j) m = vmax(m, srow[j]);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < S; ++j) {
      prow[j] = i2c::fast_exp<T>(srow[j] - m);
      sum += prow[j];
    }
    const T lse_i = m + i2c::fast_log<T>(sum), inv = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < S; ++j) prow[j] *= inv;
    lse[x] = lse_i;
    if (stats) {
      const T sy = i2c::sigma_eff<T>(SG[2 * i]), sx = i2c::sigma_eff<T>(SG[2 * i + 1]);
      if (drop) {
        pr.set_masked(i, sy, sx, rows, cols, br.n_img, drop);
        if (eps > T(0))
          row_stats_masked<T, true>(srow, prow, lse_i, pr, rows, cols, br.n_img, drop, eps, kl + x, ent + x,
                                    r1 + x, r2 + x);
        else
          row_stats_masked<T, false>(srow, prow, lse_i, pr, rows, cols, br.n_img, drop, eps, kl + x, ent + x,
                                     r1 + x, r2 + x);
      } else {
        pr.set(i, sy, sx, rows, cols, br.n_img);
        if (eps > T(0))
          row_stats<T, true>(srow, prow, lse_i, pr, rows, cols, br.n_img, eps, kl + x, ent + x, r1 + x, r2 + x);
        else
          row_stats<T, false>(srow, prow, lse_i, pr, rows, cols, br.n_img, eps, kl + x, ent + x, r1 + x, r2 + x);
      }
    }
  }
  i2cpu::gemm_ab<T>(nb, S, Sp, Dp, P, V, O);  // out = P V
  for (int64_t ii = 0; ii < nb; ++ii) std::copy_n(O + ii * Dp, D, out + (row0 + i0 + ii) * D);
}

// p = exp(s - lse) of a whole row, first and alone: each element is a short independent chain that the CPU
// overlaps; inside the row loops below, exp -> log(p + eps) -> ds made one chain too long to overlap (the
// loop runs latency-bound). Same values bit for bit; forward+backward 5% faster (docs/CPU_FLOOR.md).
template <typename T>
void exp_row(const T* srow, T lse, int64_t S, T* prow) {
#pragma omp simd
  for (int64_t j = 0; j < S; ++j) prow[j] = i2c::fast_exp<T>(srow[j] - lse);
}

// One query row of the backward: ds (scaled) into dsrow, p into prow, the
// prior sums into W, Sy, Sx. Per-column accumulators (col_acc): W = sum of aw,
// Sx = sum of aw * dx2, Sy = sum of ay (tw dy2 added per grid row).
template <typename T, bool HasEps>
void row_backward(const T* srow, const T* gvrow, T lse, T dfull, T g_kl_attn, T g_ent, const PriorRow<T>& pr, int rows,
                  int cols, int64_t n_img, T eps, T scale, T* prow, T* dsrow, T* W, T* Sy, T* Sx) {
  T* acc = col_acc<T>(2, cols);
  T *aw = acc, *ay = acc + cols;
  const int64_t L = int64_t(rows) * cols;
  exp_row<T>(srow, lse, n_img * L, prow);
  for (int64_t img = 0; img < n_img; ++img)
    for (int r = 0; r < rows; ++r) {
      const T tyr = pr.ty[r], ltyr = pr.lty[r], dyr = pr.dy2[r];
      const int64_t base = img * L + int64_t(r) * cols;
#pragma omp simd
      for (int c = 0; c < cols; ++c) {
        const int64_t j = base + c;
        const T lpx = srow[j] - lse;
        const T p = prow[j], t = tyr * pr.tx[c];
        const auto g = i2c::log_terms_t<HasEps, T>(p, t, lpx, ltyr + pr.ltx[c], eps);
        dsrow[j] = scale * i2c::ds_elem<T>(p, t, gvrow[j], dfull, g_kl_attn, g_ent, g);
        const T tw = i2c::tw_elem<T>(p, t, g);
        aw[c] += tw;
        ay[c] += tw * dyr;
      }
    }
  T sx = 0;
#pragma omp simd reduction(+ : sx)
  for (int c = 0; c < cols; ++c) sx += aw[c] * pr.dx2[c];
  *W = col_sum<T>(aw, cols);
  *Sy = col_sum<T>(ay, cols);
  *Sx = sx;
}

// row_backward of a masked row (scores of masked keys already -inf): also the sums of t dy^2, t dx^2
// (St y, St x), which are not separable with a mask.
template <typename T, bool HasEps>
void row_backward_masked(const T* srow, const T* gvrow, T lse, T dfull, T g_kl_attn, T g_ent, const PriorRow<T>& pr,
                         int rows, int cols, int64_t n_img, const bool* drop, T eps, T scale, T* prow, T* dsrow,
                         T* W, T* Sy, T* Sx, T* Sty, T* Stx) {
  T w = 0, sy = 0, sx = 0, sty = 0, stx = 0;
  const int64_t L = int64_t(rows) * cols;
  exp_row<T>(srow, lse, n_img * L, prow);
  for (int64_t img = 0; img < n_img; ++img)
    for (int r = 0; r < rows; ++r) {
      const T lr = pr.lty[r];
      const int64_t base = img * L + int64_t(r) * cols;
      T wr = 0, tr = 0;
#pragma omp simd reduction(+ : wr, tr, sx, stx)
      for (int c = 0; c < cols; ++c) {
        const int64_t j = base + c;
        const bool d = drop[j];
        const T lpx = srow[j] - lse, lt = (lr + pr.ltx[c] - pr.lmax) - pr.lsum;
        const T p = prow[j], t = d ? T(0) : i2c::fast_exp<T>(lt);
        const auto g = i2c::log_terms_t<HasEps, T>(p, t, lpx, lt, eps);
        dsrow[j] = d ? T(0) : scale * i2c::ds_elem<T>(p, t, gvrow[j], dfull, g_kl_attn, g_ent, g);
        const T tw = d ? T(0) : i2c::tw_elem<T>(p, t, g);
        wr += tw;
        tr += t;
        sx += tw * pr.dx2[c];
        stx += t * pr.dx2[c];
      }
      w += wr;
      sy += wr * pr.dy2[r];
      sty += tr * pr.dy2[r];
    }
  *W = w;
  *Sy = sy;
  *Sx = sx;
  *Sty = sty;
  *Stx = stx;
}

template <typename T>
void backward_task(const Branch<T>& br, int rows, int cols, T scale, T eps, int64_t kb, int64_t h,
                   const T* g_kl_attn, const T* g_kl_prior, const T* g_ent, const T* dfull, const T* lse, T* dq,
                   T* dk, T* dv, T* dsig) {
  const int64_t L = br.L, D = br.D, H = br.H, S = br.S, Sp = br.Sp, Dp = br.Dp;
  const T* KT = br.kT + (kb * H + h) * Dp * Sp;
  const T* VT = br.vT + (kb * H + h) * Dp * Sp;
  const T* K = br.kp + (kb * H + h) * S * Dp;
  // Sc, GV: scores; P, DS: probabilities and score gradients, zero beyond column S.
  T *Sc = scratch<T>(0, BM * Sp), *GV = scratch<T>(1, BM * Sp), *P = scratch<T>(2, BM * Sp),
    *DS = scratch<T>(3, BM * Sp), *DQ = scratch<T>(4, BM * Dp), *DK = scratch<T>(5, Sp * Dp),
    *DV = scratch<T>(6, Sp * Dp);
  std::fill_n(P, BM * Sp, T(0));  // the columns beyond S stay 0: gemm_atb_acc reads all Sp
  std::fill_n(DS, BM * Sp, T(0));
  std::fill_n(DK, Sp * Dp, T(0));
  std::fill_n(DV, Sp * Dp, T(0));
  thread_local PriorRow<T> pr(0, 0);
  pr.resize(rows, cols);
  const int64_t b0 = br.Bk == 1 ? 0 : kb, b1 = br.Bk == 1 ? br.B : kb + 1;
  for (int64_t b = b0; b < b1; ++b) {  // fixed order: deterministic batch reduction of dk, dv
    const int64_t row0 = (b * H + h) * L;
    const T* Q = br.qp + row0 * Dp;
    const T* G = br.gp + row0 * Dp;
    const T* SG = br.sigma + row0 * 2;
    const bool* drop = br.drop ? br.drop + b * br.drop_bs : nullptr;
    for (int64_t i0 = 0; i0 < L; i0 += BM) {
      const int64_t nb = std::min(BM, L - i0);
      i2cpu::gemm_abt<T>(nb, Sp, Dp, scale, Q + i0 * Dp, KT, Sc);  // Sc = scale Q K^T
      i2cpu::gemm_abt<T>(nb, Sp, Dp, T(1), G + i0 * Dp, VT, GV);  // GV = G V^T
      for (int64_t ii = 0; ii < nb; ++ii) {
        const int64_t i = i0 + ii, x = row0 + i;
        const T sy = i2c::sigma_eff<T>(SG[2 * i]), sx = i2c::sigma_eff<T>(SG[2 * i + 1]);
        T W, Sy, Sx, Sty, Stx;
        T *srow = Sc + ii * Sp, *gvrow = GV + ii * Sp, *prow = P + ii * Sp, *dsrow = DS + ii * Sp;
        if (drop) {
          mask_scores<T>(srow, drop, S);
          pr.set_masked(i, sy, sx, rows, cols, br.n_img, drop);
          if (eps > T(0))
            row_backward_masked<T, true>(srow, gvrow, lse[x], dfull[x], g_kl_attn[x], g_ent[x], pr, rows, cols,
                                         br.n_img, drop, eps, scale, prow, dsrow, &W, &Sy, &Sx, &Sty, &Stx);
          else
            row_backward_masked<T, false>(srow, gvrow, lse[x], dfull[x], g_kl_attn[x], g_ent[x], pr, rows, cols,
                                          br.n_img, drop, eps, scale, prow, dsrow, &W, &Sy, &Sx, &Sty, &Stx);
        } else {
          pr.set(i, sy, sx, rows, cols, br.n_img);
          if (eps > T(0))
            row_backward<T, true>(srow, gvrow, lse[x], dfull[x], g_kl_attn[x], g_ent[x], pr, rows, cols, br.n_img,
                                  eps, scale, prow, dsrow, &W, &Sy, &Sx);
          else
            row_backward<T, false>(srow, gvrow, lse[x], dfull[x], g_kl_attn[x], g_ent[x], pr, rows, cols, br.n_img,
                                   eps, scale, prow, dsrow, &W, &Sy, &Sx);
          Sty = pr.sum_t_dy2;
          Stx = pr.sum_t_dx2;
        }
        dsig[2 * x] = i2c::sigma_grad<T>(SG[2 * i], i2c::dsigma_axis<T>(g_kl_prior[x], Sy, W, Sty, sy));
        dsig[2 * x + 1] = i2c::sigma_grad<T>(SG[2 * i + 1], i2c::dsigma_axis<T>(g_kl_prior[x], Sx, W, Stx, sx));
      }
      i2cpu::gemm_ab<T>(nb, S, Sp, Dp, DS, K, DQ);                // dq = dS K
      for (int64_t ii = 0; ii < nb; ++ii) std::copy_n(DQ + ii * Dp, D, dq + (row0 + i0 + ii) * D);
      i2cpu::gemm_atb_acc<T>(nb, Sp, Dp, DS, Q + i0 * Dp, DK);  // dk += dS^T Q
      i2cpu::gemm_atb_acc<T>(nb, Sp, Dp, P, G + i0 * Dp, DV);   // dv += P^T G
    }
  }
  T* dkh = dk + (kb * H + h) * S * D;
  T* dvh = dv + (kb * H + h) * S * D;
  for (int64_t j = 0; j < S; ++j) {
    std::copy_n(DK + j * Dp, D, dkh + j * D);
    std::copy_n(DV + j * Dp, D, dvh + j * D);
  }
}

void check_branch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& s,
                  const at::Tensor& mask, int64_t rows, int64_t cols) {
  for (const auto* t : {&q, &k, &v, &s}) {
    TORCH_CHECK(t->device().is_cpu(), "fod_kernels cpu backend: tensors must be on the CPU, got ", t->device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "fod_kernels cpu backend: mixed dtypes ", q.scalar_type(),
                " and ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "fod_kernels cpu backend: inputs must be contiguous");
    TORCH_CHECK(t->dim() == 4, "fod_kernels cpu backend: inputs must be 4-D, got ", t->sizes());
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "fod_kernels cpu backend computes in float32 or float64, got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK((k.size(0) == 1 || k.size(0) == B) && k.size(1) == H && S > 0 && S % L == 0 && k.size(3) == D,
              "fod_kernels cpu backend: k must be (1 or B, H, m * L, D) with q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "fod_kernels cpu backend: v must match k, got ", v.sizes(), " vs ", k.sizes());
  TORCH_CHECK(s.size(0) == B && s.size(1) == H && s.size(2) == L && s.size(3) == 2,
              "fod_kernels cpu backend: sigma must be (B, H, L, 2), got ", s.sizes());
  TORCH_CHECK(rows > 0 && cols > 0 && rows * cols == L, "fod_kernels cpu backend: grid (", rows, ", ", cols,
              ") does not match L = ", L);
  if (mask.numel()) {
    TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.is_contiguous() &&
                    mask.dim() == 2 && (mask.size(0) == 1 || mask.size(0) == B) && mask.size(1) == S,
                "fod_kernels cpu backend: key_padding_mask must be a contiguous bool (1 or B, S) CPU tensor, got ",
                mask.scalar_type(), " ", mask.sizes());
  }
}

struct Padded {
  at::Tensor qp, kp, vp, kT, vT, gp;
  int64_t Sp, Dp;
};

Padded pad_branch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* g) {
  Padded p;
  p.Sp = round_up(k.size(2), i2cpu::NJ);
  p.Dp = round_up(q.size(3), i2cpu::NJ);
  p.qp = pad_d(q, p.Dp);
  p.kT = pad_t(k, p.Sp, p.Dp);
  p.vp = pad_d(v, p.Dp);
  if (g) {
    p.kp = pad_d(k, p.Dp);
    p.vT = pad_t(v, p.Sp, p.Dp);
    p.gp = pad_d(*g, p.Dp);
  }
  return p;
}

template <typename T>
Branch<T> make_branch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& s, const at::Tensor& mask,
                      const Padded& p) {
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  const bool masked = mask.numel() > 0;
  return Branch<T>{ptr(p.qp), ptr(p.kp), ptr(p.vp), ptr(p.kT), ptr(p.vT), ptr(p.gp), s.data_ptr<T>(),
                   masked ? mask.data_ptr<bool>() : nullptr,
                   q.size(0), k.size(0), q.size(1), q.size(2), q.size(3), k.size(2), p.Sp, p.Dp,
                   k.size(2) / q.size(2), masked && mask.size(0) > 1 ? mask.size(1) : 0};
}

std::vector<at::Tensor> forward(const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
                                const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& sigmas,
                                int64_t rows, int64_t cols, double scale, double eps,
                                const std::vector<bool>& need_stats, const std::vector<at::Tensor>& masks) {
  const size_t n = qs.size();
  TORCH_CHECK(n > 0 && ks.size() == n && vs.size() == n && sigmas.size() == n && need_stats.size() == n &&
                  masks.size() == n,
              "fod_kernels cpu backend: branch lists differ in length");
  std::vector<at::Tensor> res;
  std::vector<Padded> pads;
  for (size_t i = 0; i < n; ++i) {
    check_branch(qs[i], ks[i], vs[i], sigmas[i], masks[i], rows, cols);
    TORCH_CHECK(qs[i].scalar_type() == qs[0].scalar_type(), "fod_kernels cpu backend: branches differ in dtype");
    pads.push_back(pad_branch(qs[i], ks[i], vs[i], nullptr));
    const auto& q = qs[i];
    auto sopt = q.options();
    auto stat = [&]() { return need_stats[i] ? at::empty({q.size(0), q.size(1), q.size(2)}, sopt) : at::empty({0}, sopt); };
    res.push_back(at::empty_like(q));
    res.push_back(at::empty({q.size(0), q.size(1), q.size(2)}, sopt));
    for (int s = 0; s < 4; ++s) res.push_back(stat());
  }
  AT_DISPATCH_FLOATING_TYPES(qs[0].scalar_type(), "i2corr_cpu_forward", [&] {
    std::vector<Branch<scalar_t>> brs;
    std::vector<int64_t> first(n + 1, 0);
    for (size_t i = 0; i < n; ++i) {
      brs.push_back(make_branch<scalar_t>(qs[i], ks[i], sigmas[i], masks[i], pads[i]));
      const int64_t nblk = (brs[i].L + BM - 1) / BM;
      first[i + 1] = first[i] + brs[i].B * brs[i].H * nblk;
    }
    run_tasks(first[n], [&](int64_t task) {
      size_t i = 0;
      while (task >= first[i + 1]) ++i;
      const auto& br = brs[i];
      const int64_t t = task - first[i], nblk = (br.L + BM - 1) / BM;
      const int64_t bh = t / nblk, blk = t % nblk;
      auto ptr = [&](int s) { return need_stats[i] ? res[6 * i + s].data_ptr<scalar_t>() : nullptr; };
      forward_task<scalar_t>(br, int(rows), int(cols), scalar_t(scale), scalar_t(eps), need_stats[i], bh / br.H,
                             bh % br.H, blk * BM, res[6 * i].data_ptr<scalar_t>(),
                             res[6 * i + 1].data_ptr<scalar_t>(), ptr(2), ptr(3), ptr(4), ptr(5));
    });
  });
  return res;
}

std::vector<at::Tensor> backward(const std::vector<at::Tensor>& g_outs, const std::vector<at::Tensor>& g_kl_attns,
                                 const std::vector<at::Tensor>& g_kl_priors, const std::vector<at::Tensor>& g_ents,
                                 const std::vector<at::Tensor>& dfulls, const std::vector<at::Tensor>& qs,
                                 const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs,
                                 const std::vector<at::Tensor>& sigmas, const std::vector<at::Tensor>& lses,
                                 int64_t rows, int64_t cols, double scale, double eps,
                                 const std::vector<at::Tensor>& masks) {
  const size_t n = qs.size();
  TORCH_CHECK(n > 0 && g_outs.size() == n && g_kl_attns.size() == n && g_kl_priors.size() == n && g_ents.size() == n &&
                  dfulls.size() == n && ks.size() == n && vs.size() == n && sigmas.size() == n && lses.size() == n &&
                  masks.size() == n,
              "fod_kernels cpu backend: branch lists differ in length");
  std::vector<at::Tensor> res, gs, g_kl_attn_c, g_kl_prior_c, g_ent_c, dfs, ls;
  std::vector<Padded> pads;
  for (size_t i = 0; i < n; ++i) {
    check_branch(qs[i], ks[i], vs[i], sigmas[i], masks[i], rows, cols);
    TORCH_CHECK(qs[i].scalar_type() == qs[0].scalar_type(), "fod_kernels cpu backend: branches differ in dtype");
    const auto& q = qs[i];
    auto row_stat = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == q.size(2),
                  "fod_kernels cpu backend: ", name, " must be (B, H, L), got ", t.sizes());
      return t.to(q.scalar_type()).contiguous();
    };
    TORCH_CHECK(g_outs[i].sizes() == q.sizes(), "fod_kernels cpu backend: g_out must match q");
    gs.push_back(g_outs[i].to(q.scalar_type()).contiguous());
    pads.push_back(pad_branch(q, ks[i], vs[i], &gs.back()));
    g_kl_attn_c.push_back(row_stat(g_kl_attns[i], "g_kl_attn"));
    g_kl_prior_c.push_back(row_stat(g_kl_priors[i], "g_kl_prior"));
    g_ent_c.push_back(row_stat(g_ents[i], "g_ent"));
    dfs.push_back(row_stat(dfulls[i], "dfull"));
    ls.push_back(row_stat(lses[i], "lse"));
    res.push_back(at::empty_like(q));
    res.push_back(at::empty_like(ks[i]));
    res.push_back(at::empty_like(vs[i]));
    res.push_back(at::empty_like(sigmas[i]));
  }
  AT_DISPATCH_FLOATING_TYPES(qs[0].scalar_type(), "i2corr_cpu_backward", [&] {
    std::vector<Branch<scalar_t>> brs;
    std::vector<std::pair<int64_t, int64_t>> order;  // (cost, task) sorted, costliest first
    std::vector<int64_t> first(n + 1, 0);
    for (size_t i = 0; i < n; ++i) {
      brs.push_back(make_branch<scalar_t>(qs[i], ks[i], sigmas[i], masks[i], pads[i]));
      first[i + 1] = first[i] + brs[i].Bk * brs[i].H;
      const int64_t per = (brs[i].Bk == 1 ? brs[i].B : 1) * brs[i].L * brs[i].n_img;
      for (int64_t t = first[i]; t < first[i + 1]; ++t) order.emplace_back(-per, t);
    }
    std::stable_sort(order.begin(), order.end());
    run_tasks(first[n], [&](int64_t slot) {
      const int64_t task = order[slot].second;
      size_t i = 0;
      while (task >= first[i + 1]) ++i;
      const auto& br = brs[i];
      const int64_t t = task - first[i];
      auto P = [&](const at::Tensor& x) { return x.data_ptr<scalar_t>(); };
      backward_task<scalar_t>(br, int(rows), int(cols), scalar_t(scale), scalar_t(eps), t / br.H, t % br.H,
                              P(g_kl_attn_c[i]), P(g_kl_prior_c[i]), P(g_ent_c[i]), P(dfs[i]), P(ls[i]),
                              P(res[4 * i]), P(res[4 * i + 1]), P(res[4 * i + 2]), P(res[4 * i + 3]));
    });
  });
  return res;
}

}  // namespace

#ifndef FOD_CPU_VARIANT
#define FOD_CPU_VARIANT default
#endif
#define I2C_STR_(x) #x
#define I2C_STR(x) I2C_STR_(x)

// The widest kernel variant this CPU (and its OS) runs: ATen's sets, AVX512 = F, BW, VL, DQ (+ FMA).
// Called on the portable module, before any other variant is imported.
std::string cpu_capability() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return "avx512";
  if (avx2) return "avx2";
#endif
  return "default";
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fod_kernels: fused I2Correlation kernels for the CPU (float32, float64), variant " I2C_STR(FOD_CPU_VARIANT);
  m.attr("VARIANT") = I2C_STR(FOD_CPU_VARIANT);
  m.def("cpu_capability", &cpu_capability, "the widest kernel variant this CPU runs: avx512, avx2 or default");
  m.def("forward", &forward, "I2Correlation forward over a list of branches (masks: empty tensor = none)");
  m.def("backward", &backward, "I2Correlation backward over a list of branches (masks: empty tensor = none)");
  m.attr("SIGMA_MIN") = i2c::kSigmaMin;
}
