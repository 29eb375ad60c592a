// Kernel parameters of the CUDA I2Correlation kernels: per branch pointers and strides, shared
// shapes. Pointers are i2c::gptr (platform.cuh): plain device pointers on the GPU, bounds-checked
// pointers in the CPU simulation. Filled by the host API (i2corr_cuda.cu), read by the kernels
// (common.cuh, logz.cuh, forward.cuh, backward.cuh).
#pragma once

#include <cstdint>

#include "cuda/platform.cuh"

namespace i2c {

constexpr int NT = 256;  // threads per block
constexpr int MAX_BRANCH = 2;

// (batch, head, row) strides of a 4-D tensor in elements; its last dimension is contiguous.
// A batch-shared memory (Bk = 1) has batch stride 0.
struct Strides {
  int64_t b = 0, h = 0, l = 0;
};

// What every kernel reads of one branch (FlashAttention's Qkv_params): the inputs, their strides, the prior's
// normaliser rows and the key_padding_mask. Filled once per branch by the host API's set_inputs().
// Row vectors (logz, lmax, lse and the statistics) are the host API's own contiguous (B, H, L) float32 tensors.
// sigma and dsigma are float32 whatever T is (the prior is computed in float32; bf16 widths underflow).
template <typename T> struct BranchInputs {
  gptr<const T> q, k, v;
  gptr<const float> sigma;
  gptr<const float> logz, lmax;  // lmax: extended launches only (see LogzParams)
  gptr<const bool> drop;  // key_padding_mask (1 or B, S), True = ignore; null: none (extended launches only)
  Strides sq, sk, sv, ss;
  int64_t drop_bs;  // batch stride of drop: 0 for a (1, S) mask
  int Bk, D, S;     // S: keys, n_img * L (= L in the plain launches)
};

// One branch of the forward: its outputs.
template <typename T> struct FwdBranch : BranchInputs<T> {
  gptr<T> out;
  gptr<float> lse, kl, ent, r1, r2;
  Strides so;
  bool need;
};

template <typename T> struct FwdParams {
  FwdBranch<T> br[MAX_BRANCH];
  int64_t nbh[MAX_BRANCH];        // (batch, head) programs of each branch (0: no such branch)
  int64_t first[MAX_BRANCH + 1];  // block offsets of the branches, set by the launcher
  int B, H, L, cols;
  float scale, eps;
};

// One branch of the backward: the upstream gradients g_out (B,H,L,D) and, per row, g_kl_attn,
// g_kl_prior, g_ent; dfull = <g_out, out> + g_kl_attn * r1 + g_ent * r2 (spec section 3).
template <typename T> struct BwdBranch : BranchInputs<T> {
  gptr<const T> g_out;
  gptr<const float> g_kl_attn, g_kl_prior, g_ent, dfull, lse;
  gptr<T> dq, dk, dv;
  gptr<float> dsigma;
  Strides sgo, sdq, sdk, sdv, sds;
};

template <typename T> struct BwdParams {
  BwdBranch<T> br[MAX_BRANCH];
  int64_t nbh[MAX_BRANCH];        // query side: B * H; key side: Bk * H (set per launch)
  int64_t first[MAX_BRANCH + 1];
  int B, H, L, cols;
  float scale, eps;
};

// The prior's normaliser per query row. Plain launches (S = L, no mask): logz = log Z_i of the separable
// prior, log t = l - logz. Extended launches (a key_padding_mask or S = n_img * L): lmax = the largest l of a
// kept key and logz = log sum exp(l - lmax) over the kept keys, log t = (l - lmax) - logz, in that order, as
// the CPU kernels (folding lmax into logz would cost ulp(|l|) in every log t when the own position is masked).
template <typename T> struct LogzParams {
  gptr<const float> sigma[MAX_BRANCH];
  Strides ss[MAX_BRANCH];
  gptr<float> logz[MAX_BRANCH], lmax[MAX_BRANCH];
  gptr<const bool> drop[MAX_BRANCH];
  int64_t drop_bs[MAX_BRANCH];
  int S[MAX_BRANCH];
  int64_t n;  // B * H * L per branch
  int nbranch, H, L, rows, cols;
};

}  // namespace i2c
