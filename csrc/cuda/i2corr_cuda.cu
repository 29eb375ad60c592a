// Host API of the CUDA I2Correlation kernels (fod_kernels._C_cuda): argument checks, output
// allocation and the kernel parameters. The layout of the CUDA sources follows FlashAttention's:
//   params.h     kernel parameters (BranchInputs: what every kernel reads of a branch; the per-kernel params)
//   common.cuh   device helpers, the task decode and the query-side block info (QueryBlock)
//   logz.cuh, forward.cuh, backward.cuh   the kernels and their shared-memory layouts
//   launch.cuh   launch templates, tile shapes per head-dim bucket
//   platform.cuh what the GPU build and the CPU simulation (sim_cpu.cuh) do differently
//   bindings.cpp Python bindings
// Inputs may be strided views (e.g. (B, L, H, D) projections viewed as (B, H, L, D)); only the
// last dimension must be contiguous. Outputs are contiguous (the kernels take their strides too).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cuda/launch.cuh"

namespace {

using i2c::gmem;
using i2c::kName;
using i2c::MAX_BRANCH;

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.defined(), kName, ": ", name, " is undefined");
  TORCH_CHECK(i2c::on_device(t), kName, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), kName, ": ", name, " is on ", t.device(), " but q is on ", ref.device());
}

// A 4-D input: any (batch, head, row) strides, a contiguous last dimension.
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, kName, ": ", name, " must be 4-D, got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, kName, ": ", name,
              " must have a contiguous last dimension, got strides ", t.strides());
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(t.stride(d) >= 0, kName, ": ", name, " has a negative stride ", t.strides());
}

// A (B, H, L) float32 row vector the kernels index as contiguous.
void check_row_vector(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_tensor(t, name, q);
  TORCH_CHECK(t.scalar_type() == at::kFloat, kName, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == q.size(2), kName,
              ": ", name, " must be (B, H, L) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), kName, ": ", name, " must be contiguous");
}

void check_dtype(const at::Tensor& q) {
  const auto st = q.scalar_type();
  TORCH_CHECK(st != at::kDouble, kName, ": dtype float64 is not supported (it takes float32, bfloat16, float16); "
              "float64 runs on backend='reference' (any device) and backend='cpu' (CPU tensors)");
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, kName,
              ": dtype ", st, " is not supported (float32, bfloat16, float16 only)");
}

// Checks one branch; returns its head-dim bucket.
int check_branch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& s,
                 const at::Tensor& q0, int64_t rows, int64_t cols) {
  check_tensor(q, "q", q0);
  check_tensor(k, "k", q0);
  check_tensor(v, "v", q0);
  check_tensor(s, "sigma", q0);
  check_dtype(q);
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), kName, ": q, k, v must share a dtype, got ",
                q.scalar_type(), " and ", t->scalar_type());
  TORCH_CHECK(s.scalar_type() == at::kFloat, kName, ": sigma must be float32 (the prior is computed in float32, ",
              "whatever q's dtype), got ", s.scalar_type());
  TORCH_CHECK(q.scalar_type() == q0.scalar_type(), kName, ": the branches differ in dtype (", q0.scalar_type(),
              " and ", q.scalar_type(), ")");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && s.dim() == 4, kName,
              ": q, k, v, sigma must be 4-D, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes(), ", ", s.sizes());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  TORCH_CHECK(q0.dim() == 4 && q0.size(0) == B && q0.size(1) == H && q0.size(2) == L, kName,
              ": the branches must share (B, H, L), got ", q0.sizes(), " and ", q.sizes());
  TORCH_CHECK(B > 0 && H > 0 && L > 0, kName, ": empty input, q has shape ", q.sizes());
  const int64_t S = k.size(2);
  TORCH_CHECK((k.size(0) == 1 || k.size(0) == B) && k.size(1) == H && S > 0 && S % L == 0 && k.size(3) == D, kName,
              ": k must be (1 or B, H, S, D) with S a multiple of L (a memory of S / L images) and q ", q.sizes(),
              ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), kName, ": v must match k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(s.size(0) == B && s.size(1) == H && s.size(2) == L && s.size(3) == 2, kName,
              ": sigma must be (B, H, L, 2) = (", B, ", ", H, ", ", L, ", 2), got ", s.sizes());
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  check_rows(s, "sigma");
  TORCH_CHECK(rows > 0 && cols > 0 && rows * cols == L, kName, ": grid (", rows, ", ", cols,
              ") does not match L = ", L);
  TORCH_CHECK(B * H * S * std::max<int64_t>(D, 2) < (int64_t(1) << 40) && S < (int64_t(1) << 30), kName,
              ": input too large, q has shape ", q.sizes());
  return i2c::bucket(int(D));
}

// A key_padding_mask: undefined or empty = none; else a contiguous bool (1 or B, S) tensor beside q.
bool check_mask(const at::Tensor& m, const at::Tensor& q, const at::Tensor& k) {
  if (!m.defined() || m.numel() == 0) return false;
  check_tensor(m, "key_padding_mask", q);
  TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && (m.size(0) == 1 || m.size(0) == q.size(0)) &&
                  m.size(1) == k.size(2) && m.is_contiguous(),
              kName, ": key_padding_mask must be a contiguous bool (1 or B, S) = (1 or ", q.size(0), ", ", k.size(2),
              ") tensor, got ", m.scalar_type(), " ", m.sizes());
  return true;
}

// Whether the call needs the extended kernels (a mask or S != L); checks the masks. masks: empty = none.
bool extended(const std::vector<at::Tensor>& masks, const std::vector<at::Tensor>& qs,
              const std::vector<at::Tensor>& ks) {
  TORCH_CHECK(masks.empty() || masks.size() == qs.size(), kName, ": ", masks.size(), " masks for ", qs.size(),
              " branches");
  bool ext = false;
  for (size_t i = 0; i < qs.size(); ++i) {
    if (!masks.empty() && check_mask(masks[i], qs[i], ks[i])) ext = true;
    if (ks[i].size(2) != qs[i].size(2)) ext = true;
  }
  return ext;
}

// Branch i's mask as the kernels read it, when it has one: the pointer and the batch stride (0 for (1, S)).
void set_mask(const std::vector<at::Tensor>& masks, size_t i, i2c::gptr<const bool>& drop, int64_t& drop_bs) {
  if (masks.empty() || !masks[i].defined() || masks[i].numel() == 0) return;
  drop = gmem<const bool>(masks[i]);
  drop_bs = masks[i].size(0) == 1 ? 0 : masks[i].size(1);
}

// (batch, head, row) strides; batch stride 0 for a batch-shared memory (batch 1).
i2c::Strides strides(const at::Tensor& t) {
  return i2c::Strides{t.size(0) == 1 ? 0 : t.stride(0), t.stride(1), t.stride(2)};
}

// What every kernel reads of branch i (BranchInputs), for the forward and the backward alike.
template <typename T, bool EXT>
void set_inputs(i2c::BranchInputs<T>& b, size_t i, const std::vector<at::Tensor>& qs,
                const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs,
                const std::vector<at::Tensor>& sigmas, const std::vector<at::Tensor>& masks,
                const std::vector<at::Tensor>& logz, const std::vector<at::Tensor>& lmax) {
  b.q = gmem<const T>(qs[i]);
  b.k = gmem<const T>(ks[i]);
  b.v = gmem<const T>(vs[i]);
  b.sigma = gmem<const float>(sigmas[i]);
  b.logz = gmem<const float>(logz[i]);
  b.sq = strides(qs[i]);
  b.sk = strides(ks[i]);
  b.sv = strides(vs[i]);
  b.ss = strides(sigmas[i]);
  b.Bk = int(ks[i].size(0));
  b.D = int(qs[i].size(3));
  b.S = int(ks[i].size(2));
  if (EXT) {
    b.lmax = gmem<const float>(lmax[i]);
    set_mask(masks, i, b.drop, b.drop_bs);
  }
}

// logZ (plain) or lmax and logz over the kept keys (EXT) of every query row: see LogzParams.
template <typename T, bool EXT>
void launch_logz(const std::vector<at::Tensor>& sigmas, const std::vector<at::Tensor>& ks,
                 const std::vector<at::Tensor>& masks, const std::vector<at::Tensor>& logz,
                 const std::vector<at::Tensor>& lmax, int rows, int cols, cudaStream_t stream) {
  const int n = int(sigmas.size());
  i2c::LogzParams<T> Z{};
  Z.nbranch = n;
  Z.n = sigmas[0].size(0) * sigmas[0].size(1) * sigmas[0].size(2);
  Z.H = int(sigmas[0].size(1));
  Z.L = int(sigmas[0].size(2));
  Z.rows = rows;
  Z.cols = cols;
  for (int i = 0; i < n; ++i) {
    Z.sigma[i] = gmem<const float>(sigmas[i]);
    Z.ss[i] = strides(sigmas[i]);
    Z.logz[i] = gmem<float>(logz[i]);
    if (EXT) {
      Z.lmax[i] = gmem<float>(lmax[i]);
      Z.S[i] = int(ks[i].size(2));
      set_mask(masks, size_t(i), Z.drop[i], Z.drop_bs[i]);
    }
  }
  i2c::launch_logz<T, EXT>(Z, stream);
}

template <typename T, bool EXT>
void forward_impl(const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
                  const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& sigmas,
                  const std::vector<at::Tensor>& masks, const std::vector<at::Tensor>& logz,
                  const std::vector<at::Tensor>& lmax, std::vector<at::Tensor>& res, int rows, int cols,
                  float scale, float eps, const std::vector<bool>& need, int dmax) {
  const int n = int(qs.size());
  const int B = int(qs[0].size(0)), H = int(qs[0].size(1)), L = int(qs[0].size(2));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bool any = false;
  for (bool x : need) any = any || x;
  if (any) launch_logz<T, EXT>(sigmas, ks, masks, logz, lmax, rows, cols, stream);
  i2c::FwdParams<T> P{};
  P.B = B;
  P.H = H;
  P.L = L;
  P.cols = cols;
  P.scale = scale;
  P.eps = eps;
  for (int i = 0; i < n; ++i) {
    P.nbh[i] = int64_t(B) * H;
    auto& b = P.br[i];
    set_inputs<T, EXT>(b, size_t(i), qs, ks, vs, sigmas, masks, logz, lmax);
    b.out = gmem<T>(res[6 * i]);
    b.lse = gmem<float>(res[6 * i + 1]);
    b.need = need[i];
    if (need[i]) {
      b.kl = gmem<float>(res[6 * i + 2]);
      b.ent = gmem<float>(res[6 * i + 3]);
      b.r1 = gmem<float>(res[6 * i + 4]);
      b.r2 = gmem<float>(res[6 * i + 5]);
    }
    b.so = strides(res[6 * i]);
  }
  i2c::fwd_dispatch<T, EXT>(P, dmax, stream);
}

template <typename T, bool EXT>
void backward_impl(const std::vector<at::Tensor>& g_outs, const std::vector<at::Tensor>& g_kl_attns,
                   const std::vector<at::Tensor>& g_kl_priors, const std::vector<at::Tensor>& g_ents,
                   const std::vector<at::Tensor>& dfulls, const std::vector<at::Tensor>& qs,
                   const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs,
                   const std::vector<at::Tensor>& sigmas, const std::vector<at::Tensor>& lses,
                   const std::vector<at::Tensor>& masks, const std::vector<at::Tensor>& logz,
                   const std::vector<at::Tensor>& lmax, std::vector<at::Tensor>& res, int rows, int cols, float scale,
                   float eps, int dmax) {
  const int n = int(qs.size());
  const int B = int(qs[0].size(0)), H = int(qs[0].size(1)), L = int(qs[0].size(2));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_logz<T, EXT>(sigmas, ks, masks, logz, lmax, rows, cols, stream);
  i2c::BwdParams<T> P{};
  P.B = B;
  P.H = H;
  P.L = L;
  P.cols = cols;
  P.scale = scale;
  P.eps = eps;
  int64_t bks[MAX_BRANCH] = {0, 0};  // key batch of each branch, 0: no such branch
  for (int i = 0; i < n; ++i) {
    auto& b = P.br[i];
    set_inputs<T, EXT>(b, size_t(i), qs, ks, vs, sigmas, masks, logz, lmax);
    b.g_out = gmem<const T>(g_outs[i]);
    b.g_kl_attn = gmem<const float>(g_kl_attns[i]);
    b.g_kl_prior = gmem<const float>(g_kl_priors[i]);
    b.g_ent = gmem<const float>(g_ents[i]);
    b.dfull = gmem<const float>(dfulls[i]);
    b.lse = gmem<const float>(lses[i]);
    b.dq = gmem<T>(res[4 * i]);
    b.dk = gmem<T>(res[4 * i + 1]);
    b.dv = gmem<T>(res[4 * i + 2]);
    b.dsigma = gmem<float>(res[4 * i + 3]);
    b.sgo = strides(g_outs[i]);
    b.sdq = strides(res[4 * i]);
    b.sdk = strides(res[4 * i + 1]);
    b.sdv = strides(res[4 * i + 2]);
    b.sds = strides(res[4 * i + 3]);
    bks[i] = ks[i].size(0);
  }
  i2c::bwd_dispatch<T, EXT>(P, bks, dmax, stream);
}

// An output of t's shape and dtype: contiguous, whatever t's layout (the op's contract).
at::Tensor like(const at::Tensor& t) { return at::empty(t.sizes(), t.options()); }

}  // namespace

std::vector<at::Tensor> i2corr_cuda_forward(const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
                                            const std::vector<at::Tensor>& vs,
                                            const std::vector<at::Tensor>& sigmas, int64_t rows, int64_t cols,
                                            double scale, double eps, const std::vector<bool>& need_stats,
                                            const std::vector<at::Tensor>& masks) {
  const size_t n = qs.size();
  TORCH_CHECK(n >= 1 && n <= MAX_BRANCH, kName, ": 1 or 2 branches, got ", n);
  TORCH_CHECK(ks.size() == n && vs.size() == n && sigmas.size() == n && need_stats.size() == n, kName,
              ": branch lists differ in length");
  TORCH_CHECK(scale > 0 && std::isfinite(scale), kName, ": scale must be positive and finite, got ", scale);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), kName, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(qs[0].defined() && i2c::on_device(qs[0]), kName, ": q must be a CUDA tensor");
  int dmax = 32;
  for (size_t i = 0; i < n; ++i) dmax = std::max(dmax, check_branch(qs[i], ks[i], vs[i], sigmas[i], qs[0], rows, cols));
  const bool ext = extended(masks, qs, ks);
  const c10::cuda::CUDAGuard guard(qs[0].device());
  const auto& q0 = qs[0];
  const int64_t B = q0.size(0), H = q0.size(1), L = q0.size(2);
  auto fopt = q0.options().dtype(at::kFloat);
  std::vector<at::Tensor> res, logz, lmax;
  for (size_t i = 0; i < n; ++i) {
    res.push_back(like(qs[i]));
    res.push_back(at::empty({B, H, L}, fopt));
    for (int s = 0; s < 4; ++s) res.push_back(need_stats[i] ? at::empty({B, H, L}, fopt) : at::empty({0}, fopt));
    logz.push_back(at::empty({B, H, L}, fopt));
    if (ext) lmax.push_back(at::empty({B, H, L}, fopt));
  }
  const int r = int(rows), c = int(cols);
  const float sc = float(scale), ep = float(eps);
#define I2C_FWD(T, E) forward_impl<T, E>(qs, ks, vs, sigmas, masks, logz, lmax, res, r, c, sc, ep, need_stats, dmax)
  switch (q0.scalar_type()) {
    case at::kFloat: ext ? I2C_FWD(float, true) : I2C_FWD(float, false); break;
    case at::kBFloat16: ext ? I2C_FWD(at::BFloat16, true) : I2C_FWD(at::BFloat16, false); break;
    default: ext ? I2C_FWD(at::Half, true) : I2C_FWD(at::Half, false); break;
  }
#undef I2C_FWD
  return res;
}

std::vector<at::Tensor> i2corr_cuda_backward(
    const std::vector<at::Tensor>& g_outs, const std::vector<at::Tensor>& g_kl_attns,
    const std::vector<at::Tensor>& g_kl_priors, const std::vector<at::Tensor>& g_ents,
    const std::vector<at::Tensor>& dfulls, const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
    const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& sigmas, const std::vector<at::Tensor>& lses,
    int64_t rows, int64_t cols, double scale, double eps, const std::vector<at::Tensor>& masks) {
  const size_t n = qs.size();
  TORCH_CHECK(n >= 1 && n <= MAX_BRANCH, kName, ": 1 or 2 branches, got ", n);
  TORCH_CHECK(g_outs.size() == n && g_kl_attns.size() == n && g_kl_priors.size() == n && g_ents.size() == n &&
                  dfulls.size() == n && ks.size() == n && vs.size() == n && sigmas.size() == n && lses.size() == n,
              kName, ": branch lists differ in length");
  TORCH_CHECK(scale > 0 && std::isfinite(scale), kName, ": scale must be positive and finite, got ", scale);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), kName, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(qs[0].defined() && i2c::on_device(qs[0]), kName, ": q must be a CUDA tensor");
  int dmax = 32;
  for (size_t i = 0; i < n; ++i) {
    const auto& q = qs[i];
    dmax = std::max(dmax, check_branch(q, ks[i], vs[i], sigmas[i], qs[0], rows, cols));
    check_tensor(g_outs[i], "g_out", q);
    TORCH_CHECK(g_outs[i].sizes() == q.sizes() && g_outs[i].scalar_type() == q.scalar_type(), kName,
                ": g_out must match q (", q.sizes(), ", ", q.scalar_type(), "), got ", g_outs[i].sizes(), ", ",
                g_outs[i].scalar_type());
    check_rows(g_outs[i], "g_out");
    check_row_vector(g_kl_attns[i], "g_kl_attn", q);
    check_row_vector(g_kl_priors[i], "g_kl_prior", q);
    check_row_vector(g_ents[i], "g_ent", q);
    check_row_vector(dfulls[i], "dfull", q);
    check_row_vector(lses[i], "lse", q);
  }
  const bool ext = extended(masks, qs, ks);
  const c10::cuda::CUDAGuard guard(qs[0].device());
  const auto& q0 = qs[0];
  auto fopt = q0.options().dtype(at::kFloat);
  std::vector<at::Tensor> res, logz, lmax;
  for (size_t i = 0; i < n; ++i) {
    res.push_back(like(qs[i]));
    res.push_back(like(ks[i]));
    res.push_back(like(vs[i]));
    res.push_back(like(sigmas[i]));
    logz.push_back(at::empty({q0.size(0), q0.size(1), q0.size(2)}, fopt));
    if (ext) lmax.push_back(at::empty({q0.size(0), q0.size(1), q0.size(2)}, fopt));
  }
  const int r = int(rows), c = int(cols);
  const float sc = float(scale), ep = float(eps);
#define I2C_BWD(T, E) backward_impl<T, E>(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, \
                                          masks, logz, lmax, res, r, c, sc, ep, dmax)
  switch (q0.scalar_type()) {
    case at::kFloat: ext ? I2C_BWD(float, true) : I2C_BWD(float, false); break;
    case at::kBFloat16: ext ? I2C_BWD(at::BFloat16, true) : I2C_BWD(at::BFloat16, false); break;
    default: ext ? I2C_BWD(at::Half, true) : I2C_BWD(at::Half, false); break;
  }
#undef I2C_BWD
  return res;
}
