// Small-GEMM micro-kernels for the CPU kernels: one short dimension (the head dim or a
// 32-row block), register-blocked MR rows x NW columns, vectorised by `#pragma omp simd`.
// MR is per instruction-set variant (the file is compiled once per variant): an FMA has a
// latency of 4 cycles and two ports issue one each per cycle, so 8 independent accumulator
// vectors keep the units busy. AVX2: 4 rows x 2 ymm = 8; AVX-512: 8 rows x 2 zmm = 16 (of 32 registers; see
// NW); SSE: 4 rows x 4 xmm = 16 (of 16 registers).
// They run inside our own parallel tasks with no library call, so no nested threading
// runtime can spin against our threads (calling MKL there stalled for seconds under load).
// Padded dimensions (Lp, Dp) are multiples of NJ, with zeros in the padding.
#pragma once
#include <cstdint>
#include <algorithm>
namespace i2cpu {
constexpr int NJ = 16;  // vector chunk (columns); padded dims are multiples of it
#if defined(__AVX512F__)
constexpr int MR = 8;  // rows per register block (see above); 32-row blocks and padded dims are multiples of it
#else
constexpr int MR = 4;
#endif
// Register blocks are MR rows x NW<T> columns: under AVX-512, float, two zmm per row (16 accumulators of 32
// registers), so each k step loads 2 vectors and MR broadcasts for 2 MR FMAs instead of 1 and MR for MR;
// elsewhere one chunk of NJ (the registers are full). Columns beyond the last full NW block go by NJ.
template <typename T>
constexpr int NW = (MR == 8 && sizeof(T) == 4) ? 2 * NJ : NJ;
// C[i, j0:j0+W] = alpha * A[i, :Dp] . BT[:Dp, j0:j0+W]   (A rows lda = Dp, BT rows ld = Lp, C rows ld = Lp)
template <typename T, int MR, int W>
inline void abt_block(int64_t i, int64_t j0, int64_t Lp, int64_t Dp, T alpha, const T* A, const T* BT, T* C) {
  T acc[MR][W] = {};
  for (int64_t d = 0; d < Dp; ++d) {
    const T* b = BT + d * Lp + j0;
    for (int r = 0; r < MR; ++r) {
      const T a = A[(i + r) * Dp + d];
#pragma omp simd
      for (int jj = 0; jj < W; ++jj) acc[r][jj] += a * b[jj];
    }
  }
  for (int r = 0; r < MR; ++r)
#pragma omp simd
    for (int jj = 0; jj < W; ++jj) C[(i + r) * Lp + j0 + jj] = alpha * acc[r][jj];
}
template <typename T, int MR>
inline void abt_rows(int64_t i, int64_t Lp, int64_t Dp, T alpha, const T* A, const T* BT, T* C) {
  int64_t j0 = 0;
  for (; j0 + NW<T> <= Lp; j0 += NW<T>) abt_block<T, MR, NW<T>>(i, j0, Lp, Dp, alpha, A, BT, C);
  for (; j0 < Lp; j0 += NJ) abt_block<T, MR, NJ>(i, j0, Lp, Dp, alpha, A, BT, C);
}
// C[i, :Lp] = alpha * A[i, :Dp] . BT[:Dp, :Lp]
template <typename T>
void gemm_abt(int64_t nb, int64_t Lp, int64_t Dp, T alpha, const T* A, const T* BT, T* C) {
  int64_t i = 0;
  for (; i + MR <= nb; i += MR) abt_rows<T, MR>(i, Lp, Dp, alpha, A, BT, C);
  for (; i < nb; ++i) abt_rows<T, 1>(i, Lp, Dp, alpha, A, BT, C);
}
// C[i, d0:d0+W] = P[i, :L] . V[:L, d0:d0+W]   (P rows ld = Lp, V rows ld = Dp, C rows ld = Dp)
template <typename T, int MR, int W>
inline void ab_block(int64_t i, int64_t d0, int64_t L, int64_t Lp, int64_t Dp, const T* P, const T* V, T* C) {
  T acc[MR][W] = {};
  for (int64_t j = 0; j < L; ++j) {
    const T* v = V + j * Dp + d0;
    for (int r = 0; r < MR; ++r) {
      const T p = P[(i + r) * Lp + j];
#pragma omp simd
      for (int dd = 0; dd < W; ++dd) acc[r][dd] += p * v[dd];
    }
  }
  for (int r = 0; r < MR; ++r)
#pragma omp simd
    for (int dd = 0; dd < W; ++dd) C[(i + r) * Dp + d0 + dd] = acc[r][dd];
}
template <typename T, int MR>
inline void ab_rows(int64_t i, int64_t L, int64_t Lp, int64_t Dp, const T* P, const T* V, T* C) {
  int64_t d0 = 0;
  for (; d0 + NW<T> <= Dp; d0 += NW<T>) ab_block<T, MR, NW<T>>(i, d0, L, Lp, Dp, P, V, C);
  for (; d0 < Dp; d0 += NJ) ab_block<T, MR, NJ>(i, d0, L, Lp, Dp, P, V, C);
}
// C[i, :Dp] = P[i, :L] . V[:L, :Dp]
template <typename T>
void gemm_ab(int64_t nb, int64_t L, int64_t Lp, int64_t Dp, const T* P, const T* V, T* C) {
  int64_t i = 0;
  for (; i + MR <= nb; i += MR) ab_rows<T, MR>(i, L, Lp, Dp, P, V, C);
  for (; i < nb; ++i) ab_rows<T, 1>(i, L, Lp, Dp, P, V, C);
}
// C[j, d0:d0+W] += sum_i S[i, j] Q[i, d0:d0+W] for MR rows from j  (S rows ld = Lp, Q, C rows ld = Dp)
template <typename T, int W>
inline void atb_block(int64_t j, int64_t d0, int64_t nb, int64_t Lp, int64_t Dp, const T* S, const T* Q, T* C) {
  T acc[MR][W];
  for (int r = 0; r < MR; ++r)
#pragma omp simd
    for (int dd = 0; dd < W; ++dd) acc[r][dd] = C[(j + r) * Dp + d0 + dd];
  for (int64_t i = 0; i < nb; ++i) {
    const T* q = Q + i * Dp + d0;
    for (int r = 0; r < MR; ++r) {
      const T s = S[i * Lp + j + r];
#pragma omp simd
      for (int dd = 0; dd < W; ++dd) acc[r][dd] += s * q[dd];
    }
  }
  for (int r = 0; r < MR; ++r)
#pragma omp simd
    for (int dd = 0; dd < W; ++dd) C[(j + r) * Dp + d0 + dd] = acc[r][dd];
}
// C[j, :Dp] += sum_i S[i, j] Q[i, :Dp] for j < Lp (a multiple of MR)
template <typename T>
void gemm_atb_acc(int64_t nb, int64_t Lp, int64_t Dp, const T* S, const T* Q, T* C) {
  for (int64_t j = 0; j < Lp; j += MR) {
    int64_t d0 = 0;
    for (; d0 + NW<T> <= Dp; d0 += NW<T>) atb_block<T, NW<T>>(j, d0, nb, Lp, Dp, S, Q, C);
    for (; d0 < Dp; d0 += NJ) atb_block<T, NJ>(j, d0, nb, Lp, Dp, S, Q, C);
  }
}
}  // namespace i2cpu
