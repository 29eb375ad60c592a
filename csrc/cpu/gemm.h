// Small-GEMM micro-kernels for the CPU kernels: one short dimension (the head dim or a
// 32-row block), register-blocked MR rows x 16 columns, vectorised by `#pragma omp simd`.
// MR is per instruction-set variant (the file is compiled once per variant): an FMA has a
// latency of 4 cycles and two ports issue one each per cycle, so 8 independent accumulator
// vectors keep the units busy. AVX2: 4 rows x 2 ymm = 8; AVX-512: 8 rows x 1 zmm = 8 (4 rows
// would leave half the AVX-512 FMA throughput unused); SSE: 4 rows x 4 xmm = 16 (of 16 registers).
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
// C[i, :Lp] = alpha * A[i, :Dp] . BT[:Dp, :Lp]   (A rows lda = Dp, BT rows ld = Lp, C rows ld = Lp)
template <typename T, int MR>
inline void abt_block(int64_t i, int64_t Lp, int64_t Dp, T alpha, const T* A, const T* BT, T* C) {
  for (int64_t j0 = 0; j0 < Lp; j0 += NJ) {
    T acc[MR][NJ] = {};
    for (int64_t d = 0; d < Dp; ++d) {
      const T* b = BT + d * Lp + j0;
      for (int r = 0; r < MR; ++r) {
        const T a = A[(i + r) * Dp + d];
#pragma omp simd
        for (int jj = 0; jj < NJ; ++jj) acc[r][jj] += a * b[jj];
      }
    }
    for (int r = 0; r < MR; ++r)
#pragma omp simd
      for (int jj = 0; jj < NJ; ++jj) C[(i + r) * Lp + j0 + jj] = alpha * acc[r][jj];
  }
}
template <typename T>
void gemm_abt(int64_t nb, int64_t Lp, int64_t Dp, T alpha, const T* A, const T* BT, T* C) {
  int64_t i = 0;
  for (; i + MR <= nb; i += MR) abt_block<T, MR>(i, Lp, Dp, alpha, A, BT, C);
  for (; i < nb; ++i) abt_block<T, 1>(i, Lp, Dp, alpha, A, BT, C);
}
// C[i, :Dp] = P[i, :L] . V[:L, :Dp]   (P rows ld = Lp, V rows ld = Dp, C rows ld = Dp)
template <typename T, int MR>
inline void ab_block(int64_t i, int64_t L, int64_t Lp, int64_t Dp, const T* P, const T* V, T* C) {
  for (int64_t d0 = 0; d0 < Dp; d0 += NJ) {
    T acc[MR][NJ] = {};
    for (int64_t j = 0; j < L; ++j) {
      const T* v = V + j * Dp + d0;
      for (int r = 0; r < MR; ++r) {
        const T p = P[(i + r) * Lp + j];
#pragma omp simd
        for (int dd = 0; dd < NJ; ++dd) acc[r][dd] += p * v[dd];
      }
    }
    for (int r = 0; r < MR; ++r)
#pragma omp simd
      for (int dd = 0; dd < NJ; ++dd) C[(i + r) * Dp + d0 + dd] = acc[r][dd];
  }
}
template <typename T>
void gemm_ab(int64_t nb, int64_t L, int64_t Lp, int64_t Dp, const T* P, const T* V, T* C) {
  int64_t i = 0;
  for (; i + MR <= nb; i += MR) ab_block<T, MR>(i, L, Lp, Dp, P, V, C);
  for (; i < nb; ++i) ab_block<T, 1>(i, L, Lp, Dp, P, V, C);
}
// C[j, :Dp] += sum_i S[i, j] Q[i, :Dp] for j < Lp (a multiple of MR)  (S rows ld = Lp, Q, C rows ld = Dp)
template <typename T>
void gemm_atb_acc(int64_t nb, int64_t Lp, int64_t Dp, const T* S, const T* Q, T* C) {
  for (int64_t j = 0; j < Lp; j += MR)
    for (int64_t d0 = 0; d0 < Dp; d0 += NJ) {
      T acc[MR][NJ];
      for (int r = 0; r < MR; ++r)
#pragma omp simd
        for (int dd = 0; dd < NJ; ++dd) acc[r][dd] = C[(j + r) * Dp + d0 + dd];
      for (int64_t i = 0; i < nb; ++i) {
        const T* q = Q + i * Dp + d0;
        for (int r = 0; r < MR; ++r) {
          const T s = S[i * Lp + j + r];
#pragma omp simd
          for (int dd = 0; dd < NJ; ++dd) acc[r][dd] += s * q[dd];
        }
      }
      for (int r = 0; r < MR; ++r)
#pragma omp simd
        for (int dd = 0; dd < NJ; ++dd) C[(j + r) * Dp + d0 + dd] = acc[r][dd];
    }
}
}  // namespace i2cpu
