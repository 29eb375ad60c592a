// Per-element mathematics of the I2Correlation operator (spec sections 1 and 3),
// shared by the C++ CPU kernels and the CUDA kernels. Everything here is
// __host__ __device__ so that the CPU tests, which run on every submission,
// guard the arithmetic that the GPU kernels use.
//
// Notation (per query row i, key j): p = softmax probability, t = normalised
// Gaussian prior, lp = log(p + eps), lt = log(t + eps), pe = p / (p + eps),
// te = t / (t + eps). With eps = 0 the logs are the exact log-softmaxes and
// pe = te = 1, which keeps every term finite where p or t underflow to 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define I2C_HD __host__ __device__ __forceinline__
#else
#define I2C_HD inline
#endif

namespace i2c {

// The smallest prior width in tokens: every kernel reads sigma as max(sigma, kSigmaMin) (sigma_eff) and gives
// dsigma = 0 below it (sigma_grad: the gradient of torch.clamp_min). It changes no value (the prior is one-hot
// far above it) and removes the NaN of sigma^2 underflowing. Must equal fod_kernels._validate.SIGMA_MIN (the
// CPU extension exports it as SIGMA_MIN; tests/kernels/test_kernel_edges.py checks that the two agree).
constexpr double kSigmaMin = 1e-6;

// ---------------------------------------------------------------------------
// exp / log. On the host, float uses a branch-free polynomial that GCC
// vectorises inside `#pragma omp simd` loops (libm's expf/logf are scalar
// calls); its relative error is about 2 ulp. Double uses libm. On the device,
// the accurate CUDA expf/logf.
// ---------------------------------------------------------------------------
I2C_HD float bits_to_float(int32_t b) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

I2C_HD int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// exp for float. x is clamped to [lo, hi] (below lo the result is flushed to 0); n = round(x / ln2)
// reaches 128 for x >= 127.5 ln2 (about 88.3763), where 2^n is not a float: the scale is then
// 2^127 times 2 (exact), which keeps exp(x) finite up to hi, where it is just below FLT_MAX.
I2C_HD float exp_poly(float x) {
  const float lo = -87.33654f, hi = 88.72283f;
  bool tiny = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // n = round(x / ln2) by the 1.5 * 2^23 trick (exact for |n| < 2^22).
  const float shifter = 12582912.0f;
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693145751953125f;   // ln2 high part (exact product)
  r = r - n * 1.42860682030941723e-6f;    // ln2 low part
  // exp(r) on |r| <= ln2 / 2, Taylor to degree 7 (truncation < 1e-8 relative).
  float p = 1.9841270e-4f;
  p = p * r + 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t ni = static_cast<int32_t>(n);
  const bool top = ni > 127;
  ni = top ? 127 : ni;
  float res = p * bits_to_float((ni + 127) << 23);
  res = top ? res * 2.0f : res;
  return tiny ? 0.0f : res;
}

// Natural log for x > 0 (denormals included).
I2C_HD float log_poly(float x) {
  bool sub = x < 1.17549435e-38f;
  x = sub ? x * 8388608.0f : x;  // 2^23
  int32_t b = float_to_bits(x);
  float ef = static_cast<float>((b >> 23) & 0xff) - (sub ? 150.0f : 127.0f);  // 150 = 127 + 23
  float m = bits_to_float((b & 0x007fffff) | 0x3f800000);  // [1, 2)
  bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  ef = big ? ef + 1.0f : ef;
  float f = m - 1.0f;
  float s = f / (2.0f + f);  // |s| <= 0.1716
  float z = s * s;
  float poly = 2.0f / 9.0f;
  poly = poly * z + 2.0f / 7.0f;
  poly = poly * z + 2.0f / 5.0f;
  poly = poly * z + 2.0f / 3.0f;
  float logm = 2.0f * s + s * z * poly;
  return ef * 0.693147180559945309f + logm;
}

template <typename T> I2C_HD T fast_exp(T x);
template <typename T> I2C_HD T fast_log(T x);
template <> I2C_HD float fast_exp<float>(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_poly(x);
#endif
}
template <> I2C_HD float fast_log<float>(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return log_poly(x);
#endif
}
template <> I2C_HD double fast_exp<double>(double x) { return exp(x); }
template <> I2C_HD double fast_log<double>(double x) { return log(x); }

// ---------------------------------------------------------------------------
// The Gaussian prior. Its log-weight is separable over the rectangular grid:
// l_ij = -dy^2 / (2 sy^2) - dx^2 / (2 sx^2), so t_ij = ty_i(row_j) * tx_i(col_j),
// with ty = softmax over the grid rows of -(row_i - r)^2 / (2 sy^2) and tx
// likewise over the columns. The maximum of each axis' log-weight is 0 (at
// r = row_i), so its normaliser is >= 1 and needs no max-shift.
// ---------------------------------------------------------------------------

// 1 / (2 s^2): the coefficient of d^2 in the negated axis log-weight.
template <typename T> I2C_HD T half_inv_sq(T s) { return T(0.5) / (s * s); }

// The width the prior uses, max(s, kSigmaMin); NaN stays NaN (as clamp_min).
template <typename T> I2C_HD T sigma_eff(T s) { return s < T(kSigmaMin) ? T(kSigmaMin) : s; }

// The gradient reaching the caller's sigma: 0 where it was raised to kSigmaMin (as clamp_min's).
template <typename T> I2C_HD T sigma_grad(T s, T g) { return s < T(kSigmaMin) ? T(0) : g; }

// Axis log-weight -d^2 * c for distance d = center - r.
template <typename T> I2C_HD T axis_logw(T center, T r, T c) {
  T d = center - r;
  return -d * d * c;
}

// log sum_r exp(-(center - r)^2 c) over r = 0..n-1.
template <typename T> I2C_HD T axis_log_norm(T center, T c, int n) {
  T z = T(0);
  for (int r = 0; r < n; ++r) z += fast_exp<T>(axis_logw<T>(center, T(r), c));
  return fast_log<T>(z);
}

// ---------------------------------------------------------------------------
// Element terms. lp, lt, pe, te as in the header comment.
// ---------------------------------------------------------------------------
template <typename T> struct LogTerms {
  T lp, lt, pe, te;
};

// p, t: probabilities; lp_exact = s_ij - lse_i, lt_exact = l_ij - logZ_i.
// HasEps is a compile-time switch so that inner loops carry no branch.
template <bool HasEps, typename T>
I2C_HD LogTerms<T> log_terms_t(T p, T t, T lp_exact, T lt_exact, T eps) {
  LogTerms<T> r;
  if (HasEps) {
    T pp = p + eps, tt = t + eps;
    r.lp = fast_log<T>(pp);
    r.lt = fast_log<T>(tt);
    r.pe = p / pp;
    r.te = t / tt;
  } else {
    r.lp = lp_exact;
    r.lt = lt_exact;
    r.pe = T(1);
    r.te = T(1);
  }
  return r;
}

template <typename T>
I2C_HD LogTerms<T> log_terms(T p, T t, T lp_exact, T lt_exact, T eps) {
  return eps > T(0) ? log_terms_t<true, T>(p, t, lp_exact, lt_exact, eps)
                    : log_terms_t<false, T>(p, t, lp_exact, lt_exact, eps);
}

// Symmetric KL element: p (lp - lt) + t (lt - lp).
template <typename T> I2C_HD T kl_elem(T p, T t, const LogTerms<T>& g) { return (p - t) * (g.lp - g.lt); }

// Entropy element: -p lp.
template <typename T> I2C_HD T ent_elem(T p, const LogTerms<T>& g) { return -p * g.lp; }

// p * dK/dp: summed over j it is R1; it enters ds with weight a_i.
template <typename T> I2C_HD T r1_elem(T p, T t, const LogTerms<T>& g) {
  return p * (g.lp - g.lt) + g.pe * (p - t);
}

// p * dE/dp: summed over j it is R2; it enters ds with weight e_i.
template <typename T> I2C_HD T r2_elem(T p, const LogTerms<T>& g) { return -p * (g.lp + g.pe); }

// t * dK/dt (spec's t * w / b): summed against dy^2, dx^2 and 1 it gives dsigma.
template <typename T> I2C_HD T tw_elem(T p, T t, const LogTerms<T>& g) {
  return t * (g.lt - g.lp) + g.te * (t - p);
}

// ds_ij = p (gv - Dfull) + g_kl_attn * r1_elem + g_ent * r2_elem  (gv = <g_out_i, v_j>; the upstream
// gradients of kl_attn and entropy, a and e in the spec).
template <typename T>
I2C_HD T ds_elem(T p, T t, T gv, T dfull, T g_kl_attn, T g_ent, const LogTerms<T>& g) {
  return p * (gv - dfull) + g_kl_attn * r1_elem<T>(p, t, g) + g_ent * r2_elem<T>(p, g);
}

// dsigma of one axis from the row sums: g_kl_prior * (sum tw d^2 - W * sum t d^2) / s^3 (g_kl_prior: the
// upstream gradient of kl_prior, b in the spec).
template <typename T> I2C_HD T dsigma_axis(T g_kl_prior, T sum_tw_d2, T W, T sum_t_d2, T s) {
  return g_kl_prior * (sum_tw_d2 - W * sum_t_d2) / (s * s * s);
}

}  // namespace i2c
