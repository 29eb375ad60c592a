// A CPU simulation of the small part of the CUDA execution model that csrc/cuda/i2corr_cuda.cu
// uses, for tests only: tests/test_cuda.py compiles the kernel file as plain C++ against it (after
// rewriting its launches and its dynamic shared-memory declaration), so the kernels' indexing,
// masking, tiling and synchronisation run and are checked on machines without a GPU.
//
// Each block runs as NT std::threads; __syncthreads is a block-wide std::barrier and
// __shfl_xor_sync exchanges through a per-block buffer between two warp-wide barriers (every
// thread of a warp calls it together, as the kernels do). Shared memory starts as NaN, so a read
// of a value no thread wrote poisons the result instead of passing unnoticed.
#pragma once

#include <c10/core/Device.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

using std::max;
using std::min;

struct SimDim {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local SimDim threadIdx, blockIdx;

namespace sim {

struct Block {
  Block(unsigned threads, size_t smem_bytes)
      : bar(threads), smem(smem_bytes / sizeof(float) + 1, std::numeric_limits<float>::quiet_NaN()),
        shfl(threads, 0.0f) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> smem, shfl;
};

inline thread_local Block* current = nullptr;

inline float* dynamic_smem() { return current->smem.data(); }

// Runs `body` for every thread of `blocks` blocks of `threads` threads, one block at a time.
template <class F>
void launch(unsigned blocks, unsigned threads, size_t smem_bytes, F&& body) {
  for (unsigned b = 0; b < blocks; ++b) {
    Block blk(threads, smem_bytes);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        current = &blk;
        body();
      });
    for (auto& th : pool) th.join();
  }
}

}  // namespace sim

inline void __syncthreads() { sim::current->bar.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float x, int lane_mask) {
  sim::Block* c = sim::current;
  const unsigned t = threadIdx.x, w = t / 32;
  c->shfl[t] = x;
  c->warps[w]->arrive_and_wait();
  const float y = c->shfl[(t & ~31u) | ((t & 31u) ^ unsigned(lane_mask))];
  c->warps[w]->arrive_and_wait();
  return y;
}

// The host API the launchers call.
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline int cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return 0; }
#define C10_CUDA_CHECK(x) (void)(x)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda
