// The CUDA extension's own sources compiled as C++ against the CPU simulation (tests only:
// tests/kernels/test_cuda.py builds this file). platform.cuh selects sim_cpu.cuh instead of the
// CUDA headers, so the kernels, launchers and host API below are exactly those of the GPU build.
#define I2C_SIM_CPU 1
#include "cuda/i2corr_cuda.cu"
#include "cuda/bindings.cpp"
