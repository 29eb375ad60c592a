// What the CUDA sources need from the platform, in one place, so that the same sources build
// for the GPU (nvcc) and, for tests, as plain C++ against the CPU simulation (I2C_SIM_CPU defined,
// see sim_cpu.cuh and sim_cpu.cpp). Everything the two builds do differently is here:
//
//   I2C_DYNAMIC_SMEM(name)            declares the kernel's dynamic shared memory as `float* name`
//   I2C_LAUNCH(kernel, blocks, threads, smem, stream, ...)   launches kernel(...)
//   i2c::gptr<T>                      a global-memory pointer: T* on the GPU; in the simulation a
//                                     pointer that checks every access against its tensor's bytes
//   i2c::gmem<T>(tensor)              the gptr<T> of a tensor argument
//   i2c::on_device(tensor)            whether a tensor is where the kernels can read it
#pragma once

#ifdef I2C_SIM_CPU

#include "cuda/sim_cpu.cuh"

#else

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define I2C_DYNAMIC_SMEM(name) extern __shared__ float name[]
#define I2C_LAUNCH(kernel, blocks, threads, smem, stream, ...) \
  kernel<<<(blocks), (threads), (smem), (stream)>>>(__VA_ARGS__)

namespace i2c {
template <typename T> using gptr = T*;
template <typename T> inline gptr<T> gmem(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
}  // namespace i2c

#endif
