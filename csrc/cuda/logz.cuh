// The prior's normaliser per query row (logz, and lmax in the extended launches): one thread per row.
#pragma once

#include "cuda/common.cuh"

namespace i2c {

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

}  // namespace i2c
