// A CPU simulation of the small part of the CUDA execution model that the kernels of csrc/cuda
// use, for tests only: csrc/cuda/sim_cpu.cpp compiles the extension's own sources as plain C++
// against it (platform.cuh picks it when I2C_SIM_CPU is defined), so the kernels' indexing,
// masking, tiling and synchronisation run and are checked on machines without a GPU.
//
// Each block runs as `threads` std::threads; __syncthreads is a block-wide barrier and
// __shfl_xor_sync exchanges through a per-block buffer between two warp-wide barriers (every
// thread of a warp calls it together, as the kernels do). Shared memory starts as NaN, so a read
// of a value no thread wrote poisons the result instead of passing unnoticed. Global memory is
// reached only through checked pointers (i2c::gptr): an access outside the bytes of the tensor a
// pointer was made from is recorded (the access itself goes to a scratch value, so the block's
// barriers still complete) and the launch then throws, naming the kernel, block, thread and offset.
//
// C++17 (no std::barrier): torch 2.11 builds extensions as C++17; newer torch as C++20.
// Define I2C_SIM_NO_TORCH to use the simulation without torch (tests/kernels/test_cuda.py does, to
// compile it as C++17 here, where torch's own headers need C++20).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
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

// A reusable barrier for n threads (C++17: mutex and condition variable).
class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const unsigned gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return gen != gen_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  unsigned n_, count_ = 0, gen_ = 0;
};

struct Block {
  Block(unsigned threads, size_t smem_bytes)
      : bar(threads), smem(smem_bytes / sizeof(float) + 1, std::numeric_limits<float>::quiet_NaN()),
        shfl(threads, 0.0f) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w)
      warps.emplace_back(std::make_unique<Barrier>(std::min(32u, threads - 32 * w)));
  }
  Barrier bar;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<float> smem, shfl;
};

inline thread_local Block* current = nullptr;

inline float* dynamic_smem() { return current->smem.data(); }

// The first out-of-bounds access of the running launch (one launch at a time).
struct Fault {
  std::mutex mu;
  bool any = false;
  std::string what;
};
inline Fault& fault() {
  static Fault f;
  return f;
}
inline thread_local const char* kernel_name = "";

inline void report_oob(std::ptrdiff_t byte_offset, size_t bytes, size_t width) {
  Fault& f = fault();
  std::lock_guard<std::mutex> lock(f.mu);
  if (f.any) return;
  f.any = true;
  std::ostringstream os;
  os << "out-of-bounds global memory access in kernel " << kernel_name << " (block " << blockIdx.x << ", thread "
     << threadIdx.x << "): " << width << " bytes at byte offset " << byte_offset << " of a tensor argument of "
     << bytes << " bytes";
  f.what = os.str();
}

// A global-memory pointer that knows the bytes [lo, hi) of the tensor it was made from.
template <typename T>
class checked_ptr {
 public:
  using element = T;
  checked_ptr() = default;
  checked_ptr(std::nullptr_t) {}
  checked_ptr(T* p, const void* lo, size_t bytes)
      : p_(reinterpret_cast<uintptr_t>(p)), lo_(reinterpret_cast<uintptr_t>(lo)), bytes_(bytes) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible<U*, T*>::value>>
  checked_ptr(const checked_ptr<U>& o) : p_(o.addr()), lo_(o.lo()), bytes_(o.bytes()) {}

  checked_ptr operator+(int64_t i) const { return shifted(i); }
  checked_ptr operator-(int64_t i) const { return shifted(-i); }
  checked_ptr& operator+=(int64_t i) { return *this = shifted(i); }
  T& operator[](int64_t i) const { return at(p_ + uintptr_t(i * int64_t(sizeof(T)))); }
  T& operator*() const { return at(p_); }
  explicit operator bool() const { return p_ != 0; }

  uintptr_t addr() const { return p_; }
  uintptr_t lo() const { return lo_; }
  size_t bytes() const { return bytes_; }

 private:
  checked_ptr shifted(int64_t i) const {
    checked_ptr r = *this;
    r.p_ = p_ + uintptr_t(i * int64_t(sizeof(T)));  // unsigned wrap-around: no UB for far-off addresses
    return r;
  }
  T& at(uintptr_t a) const {
    if (p_ != 0 && a >= lo_ && a - lo_ + sizeof(T) <= bytes_) return *reinterpret_cast<T*>(a);
    report_oob(std::ptrdiff_t(a - lo_), bytes_, sizeof(T));
    static thread_local std::remove_const_t<T> scratch{};
    scratch = std::remove_const_t<T>{};
    return scratch;
  }
  uintptr_t p_ = 0, lo_ = 0;
  size_t bytes_ = 0;
};

// Runs `body` for every thread of `blocks` blocks of `threads` threads, one block at a time; throws
// std::runtime_error if any thread accessed global memory out of bounds.
template <class F>
void launch(const char* name, unsigned blocks, unsigned threads, size_t smem_bytes, F&& body) {
  {
    std::lock_guard<std::mutex> lock(fault().mu);
    fault().any = false;
    fault().what.clear();
  }
  for (unsigned b = 0; b < blocks; ++b) {
    Block blk(threads, smem_bytes);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        current = &blk;
        kernel_name = name;
        body();
      });
    for (auto& th : pool) th.join();
  }
  std::lock_guard<std::mutex> lock(fault().mu);
  if (fault().any) throw std::runtime_error(fault().what);
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

#define I2C_DYNAMIC_SMEM(name) float* name = sim::dynamic_smem()
#define I2C_LAUNCH(kernel, blocks, threads, smem, stream, ...) \
  sim::launch(#kernel, (blocks), (threads), (smem), [&] { kernel(__VA_ARGS__); })

namespace i2c {
template <typename T> using gptr = sim::checked_ptr<T>;
}  // namespace i2c

// The host API the launchers call.
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline int cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return 0; }
#define C10_CUDA_CHECK(x) (void)(x)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0

#ifndef I2C_SIM_NO_TORCH
#include <ATen/ATen.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda

namespace i2c {
// The bytes a tensor view can reach: [data_ptr, data_ptr + span).
inline size_t span_bytes(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return size_t(last + 1) * t.element_size();
}
template <typename T> inline gptr<T> gmem(const at::Tensor& t) {
  return gptr<T>(static_cast<T*>(t.data_ptr()), t.data_ptr(), span_bytes(t));
}
inline bool on_device(const at::Tensor& t) { return t.defined(); }  // CPU tensors stand in for CUDA ones
}  // namespace i2c
#endif
