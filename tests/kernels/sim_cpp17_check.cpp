// Built by tests/kernels/test_cuda.py::test_sim_core_is_cpp17_and_catches_out_of_bounds as C++17
// without torch: the CUDA simulation (csrc/cuda/sim_cpu.cuh) and the real kernels (csrc/cuda/*.cuh,
// instantiated for float) must compile as C++17 (torch 2.11 builds extensions as C++17), the
// simulated barriers and shuffles must work, and the bounds-checked global memory must catch a
// kernel that reads one row past the end of its input. Prints one line per check.
#define I2C_SIM_CPU 1
#define I2C_SIM_NO_TORCH 1
#include "cuda/backward.cuh"
#include "cuda/forward.cuh"
#include "cuda/logz.cuh"

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace i2c {
template __global__ void fwd_kernel<float, 32, 64, 64>(FwdParams<float>);
template __global__ void dq_kernel<float, 64, 64, 64, false>(BwdParams<float>);
template __global__ void dkdv_kernel<float, 128, 64, 32, false>(BwdParams<float>);
template __global__ void logz_kernel<float, false>(LogzParams<float>);
// the extended variants (key_padding_mask, S = n_img * L)
template __global__ void fwd_ext_kernel<float, 32, 64, 64>(FwdParams<float>);
template __global__ void dq_kernel<float, 64, 64, 64, true>(BwdParams<float>);
template __global__ void dkdv_kernel<float, 128, 64, 32, true>(BwdParams<float>);
template __global__ void logz_kernel<float, true>(LogzParams<float>);
}  // namespace i2c

using i2c::gptr;

// Copies `rows` rows of an (L, D) matrix through shared memory with the kernels' own load_tile,
// and writes each row's sum (a 16-lane shuffle reduction) to sums.
__global__ void copy_rows(gptr<const float> src, gptr<float> dst, gptr<float> sums, int rows, int D) {
  I2C_DYNAMIC_SMEM(smem);
  i2c::load_tile<float, 16, 16>(smem, src, D, 0, rows, D);
  __syncthreads();
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const float x = tx < D ? smem[ty * 17 + tx] : 0.0f;
  const float s = i2c::hsum16(x);
  if (ty < rows && tx < D) dst[ty * D + tx] = x;
  if (ty < rows && tx == 0) sums[ty] = s;
}

int main() {
  const int L = 5, D = 7;
  std::vector<float> a(L * D), b(L * D, -1.0f), s(L, -1.0f);
  for (int i = 0; i < L * D; ++i) a[i] = float(i);
  const gptr<const float> src(a.data(), a.data(), a.size() * sizeof(float));
  const gptr<float> dst(b.data(), b.data(), b.size() * sizeof(float)), sums(s.data(), s.data(), s.size() * 4);
  const size_t smem = 16 * 17 * sizeof(float);

  I2C_LAUNCH(copy_rows, 1, i2c::NT, smem, nullptr, src, dst, sums, L, D);
  bool ok = b == a;
  for (int r = 0; r < L; ++r) ok = ok && s[r] == float(D * (r * D) + D * (D - 1) / 2);
  std::printf("in-bounds copy and shuffle sums: %s\n", ok ? "ok" : "WRONG");

  try {  // one row past the end of src
    I2C_LAUNCH(copy_rows, 1, i2c::NT, smem, nullptr, src, dst, sums, L + 1, D);
    std::printf("out-of-bounds read: NOT CAUGHT\n");
  } catch (const std::runtime_error& e) {
    std::printf("out-of-bounds read: caught: %s\n", e.what());
  }
  return 0;
}
