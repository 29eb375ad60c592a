// Launch templates of the CUDA I2Correlation kernels: grid sizes, shared memory, the tile shapes
// per head-dim bucket, and the order of the branches' blocks. Launches go through I2C_LAUNCH
// (platform.cuh), so the CPU simulation runs exactly these launchers.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "cuda/backward.cuh"
#include "cuda/forward.cuh"
#include "cuda/logz.cuh"

namespace i2c {

inline const char* kName = "fod_kernels cuda backend";

inline void set_smem(const void* kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// Blocks of branch 0 come first, then those of branch 1; returns the total. n[i]: the rows (queries or keys)
// that branch i tiles by `tile`.
template <typename Params>
unsigned set_first(Params& P, const int64_t (&n)[MAX_BRANCH], int tile) {
  P.first[0] = 0;
  for (int i = 0; i < MAX_BRANCH; ++i) P.first[i + 1] = P.first[i] + P.nbh[i] * ((n[i] + tile - 1) / tile);
  const int64_t total = P.first[MAX_BRANCH];
  TORCH_CHECK(total > 0 && total <= INT32_MAX, kName, ": a grid of ", total, " blocks is out of range");
  return unsigned(total);
}

template <typename T, bool EXT>
void launch_logz(const LogzParams<T>& P, cudaStream_t stream) {
  const int64_t blocks = (P.n * P.nbranch + NT - 1) / NT;
  TORCH_CHECK(blocks <= INT32_MAX, kName, ": input too large");
  auto logz = logz_kernel<T, EXT>;
  I2C_LAUNCH(logz, unsigned(blocks), NT, 0, stream, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int DMAX, int BM, int BN, bool EXT>
void launch_fwd(FwdParams<T> P, cudaStream_t stream) {
  constexpr size_t smem = FwdSmem<DMAX, BM, BN>::bytes;
  auto fwd = EXT ? fwd_ext_kernel<T, DMAX, BM, BN> : fwd_kernel<T, DMAX, BM, BN>;
  const unsigned blocks = set_first(P, {P.L, P.L}, BM);
  set_smem(reinterpret_cast<const void*>(fwd), smem);
  I2C_LAUNCH(fwd, blocks, NT, smem, stream, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int DMAX, int BM, int BN, bool EXT>
void launch_dq(BwdParams<T> P, const int64_t (&bks)[MAX_BRANCH], cudaStream_t stream) {
  constexpr size_t smem = DqSmem<DMAX, BM, BN>::bytes;
  auto dq = dq_kernel<T, DMAX, BM, BN, EXT>;
  for (int i = 0; i < MAX_BRANCH; ++i) P.nbh[i] = bks[i] > 0 ? int64_t(P.B) * P.H : 0;  // one per (b, h)
  const unsigned blocks = set_first(P, {P.L, P.L}, BM);
  set_smem(reinterpret_cast<const void*>(dq), smem);
  I2C_LAUNCH(dq, blocks, NT, smem, stream, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int DMAX, int BM, int BN, bool EXT>
void launch_dkdv(BwdParams<T> P, const int64_t (&bks)[MAX_BRANCH], cudaStream_t stream) {
  constexpr size_t smem = DkdvSmem<DMAX, BM, BN>::bytes;
  auto dkdv = dkdv_kernel<T, DMAX, BM, BN, EXT>;
  for (int i = 0; i < MAX_BRANCH; ++i) P.nbh[i] = bks[i] * P.H;  // one per (bk, h)
  // A batch-shared branch's blocks loop over the batch: schedule them first, so that the long
  // blocks do not form the tail. The kernel takes each branch from its slot, so a swap is safe.
  if (bks[1] == 1 && bks[0] > 1) {
    std::swap(P.br[0], P.br[1]);
    std::swap(P.nbh[0], P.nbh[1]);
  }
  // key tiles: S keys per branch (the kernel decodes with the same counts; the plain kernels with L)
  const unsigned blocks = set_first(P, {EXT ? P.br[0].S : P.L, EXT ? P.br[1].S : P.L}, BN);
  set_smem(reinterpret_cast<const void*>(dkdv), smem);
  I2C_LAUNCH(dkdv, blocks, NT, smem, stream, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tile sizes per head-dim bucket (shared memory stays under the 163 KiB of an A100):
//   forward     BM = BN = 64                      (D <= 128: 83 KiB)
//   dq          BM = 64, BN = 64 (32 for D > 64)  (D <= 128: 108 KiB)
//   dkdv        BN = 64 (32 for D > 64), BM = 64  (D <= 128: 116 KiB)
inline int bucket(int D) {
  TORCH_CHECK(D >= 1 && D <= 128, kName, ": head dim D must be in 1..128, got ", D);
  return D <= 32 ? 32 : D <= 64 ? 64 : 128;
}

template <typename T, bool EXT>
void fwd_dispatch(const FwdParams<T>& P, int dmax, cudaStream_t stream) {
  switch (dmax) {
    case 32: launch_fwd<T, 32, 64, 64, EXT>(P, stream); break;
    case 64: launch_fwd<T, 64, 64, 64, EXT>(P, stream); break;
    default: launch_fwd<T, 128, 64, 64, EXT>(P, stream); break;
  }
}

template <typename T, bool EXT>
void bwd_dispatch(const BwdParams<T>& P, const int64_t (&bks)[MAX_BRANCH], int dmax, cudaStream_t stream) {
  switch (dmax) {
    case 32:
      launch_dq<T, 32, 64, 64, EXT>(P, bks, stream);
      launch_dkdv<T, 32, 64, 64, EXT>(P, bks, stream);
      break;
    case 64:
      launch_dq<T, 64, 64, 64, EXT>(P, bks, stream);
      launch_dkdv<T, 64, 64, 64, EXT>(P, bks, stream);
      break;
    default:
      launch_dq<T, 128, 64, 32, EXT>(P, bks, stream);
      launch_dkdv<T, 128, 64, 32, EXT>(P, bks, stream);
      break;
  }
}

}  // namespace i2c
