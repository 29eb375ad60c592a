"""Hand-written mutants of the C++/CUDA sources, run by tools/mutants/run_cpp_mutants.py.

Each mutant is one plausible bug: `old` must occur exactly once in `file` (the runner refuses a stale mutant
rather than testing nothing). `build`: "cpu" rebuilds the CPU extension in the temporary copy; "none" needs no
build (the CUDA simulation in tests/kernels/test_cuda_sim.py and tests/kernels/test_math_ulp.py compile the sources
themselves). `groups`: the test groups of run_cpp_mutants.GROUPS that are relevant, cheapest first.

A mutant that survives must be killed by a test or carry `harmless=` with the argument why no result changes.
"""
from __future__ import annotations

from typing import NamedTuple, Optional


class Mutant(NamedTuple):
    id: str
    file: str
    old: str
    new: str
    build: str               # "cpu" | "none"
    groups: tuple
    what: str
    harmless: Optional[str] = None


MATH = "csrc/i2corr_math.h"
CPU = "csrc/cpu/i2corr_cpu.cpp"
GEMM = "csrc/cpu/gemm.h"
# the CUDA kernels (i2corr_cuda.cu holds the host side): device helpers, logz, forward and backward kernels
CUDA_COMMON, CUDA_LOGZ = "csrc/cuda/common.cuh", "csrc/cuda/logz.cuh"
CUDA_FWD, CUDA_BWD = "csrc/cuda/forward.cuh", "csrc/cuda/backward.cuh"
# The header is compiled into the CPU extension and, identically (host path), into the CUDA simulation; its
# mutants run the CPU tests (and the ulp tests), not the simulation's long compile: a header mutant that the CPU
# tests miss reaches the simulation's kernels through the same functions.
HDR = ("cpu", "ulp")
CPUG = ("cpu", "api", "edges")

MUTANTS = [
    # ------------------------------------------------------------------ csrc/i2corr_math.h
    Mutant("exp-9ulp", MATH, "p = p * r + 4.1666667e-2f;", "p = p * r + 4.1701667e-2f;", "cpu", HDR,
           "exp_poly degree-4 coefficient perturbed: about 9 ulp worse (the issue's survivor)"),
    Mutant("exp-drop-deg7", MATH, "float p = 1.9841270e-4f;\n  p = p * r + 1.3888889e-3f;",
           "float p = 1.3888889e-3f;", "cpu", HDR, "exp_poly degree-7 term dropped (max 3 ulp)"),
    Mutant("exp-2ulp", MATH, "p = p * r + 8.3333333e-3f;", "p = p * r + 8.3433333e-3f;", "cpu", HDR,
           "exp_poly degree-5 coefficient off by 1.2e-3 relative (max 2 ulp, mean error doubled)"),
    Mutant("exp-no-underflow", MATH, "return tiny ? 0.0f : res;", "return res;", "cpu", HDR,
           "exp_poly underflow branch removed: exp(-inf) = FLT_MIN instead of 0"),
    Mutant("exp-ln2-hi", MATH, "float r = x - n * 0.693145751953125f;", "float r = x - n * 0.6931457f;", "cpu", HDR,
           "exp_poly: ln2 high part rounded (the Cody-Waite product is no longer exact)"),
    Mutant("log-coef", MATH, "poly = poly * z + 2.0f / 7.0f;", "poly = poly * z + 2.0f / 7.1f;", "cpu", HDR,
           "log_poly series coefficient 2/7 perturbed",
           harmless="the 2/7 term is (2/7) s^7 <= 4e-6 x 2/7: the change moves log_poly by < 0.6 ulp at the ends of "
                    "the reduced interval only; measured with test_math_ulp's inputs: max error still 2 ulp, mean "
                    "0.093 -> 0.100 ulp (FMA build), 0.252 -> 0.258 (simulation flags). An accuracy test cannot tell "
                    "it from a compiler's different rounding, and the kernels' float32 sums cannot either"),
    Mutant("log-subnormal", MATH, "(sub ? 150.0f : 127.0f)", "(sub ? 149.0f : 127.0f)", "cpu", HDR,
           "log_poly: subnormal exponent offset off by one (every subnormal off by ln2)"),
    Mutant("log-range", MATH, "bool big = m > 1.41421356f;", "bool big = m > 1.5f;", "cpu", HDR,
           "log_poly: reduction interval [sqrt2/2, sqrt2] moved to [0.75, 1.5]",
           harmless="an equally valid reduction: |s| grows from 0.172 to 0.2, and the series' truncation stays below "
                    "1e-8 relative; measured: max error still 2 ulp, mean 0.093 -> 0.097 ulp (FMA build), 0.252 -> "
                    "0.255 (simulation flags)"),
    Mutant("drop-eps", MATH, "T pp = p + eps, tt = t + eps;", "T pp = p + eps, tt = t;", "cpu", HDR,
           "eps dropped from log(t + eps) (the issue's example)"),
    Mutant("dsigma-sign", MATH, "return g_kl_prior * (sum_tw_d2 - W * sum_t_d2) / (s * s * s);",
           "return g_kl_prior * (sum_tw_d2 + W * sum_t_d2) / (s * s * s);", "cpu", HDR,
           "flipped sign in dsigma (the issue's example)"),
    Mutant("r2-sign", MATH, "return -p * (g.lp + g.pe);", "return -p * (g.lp - g.pe);", "cpu", HDR,
           "R2 (entropy row term) sign of p/(p+eps)"),
    Mutant("half-inv-sq", MATH, "return T(0.5) / (s * s);", "return T(1) / (s * s);", "cpu", HDR,
           "prior width 1/(2 s^2) -> 1/s^2"),
    Mutant("tw-pe", MATH, "return t * (g.lt - g.lp) + g.te * (t - p);", "return t * (g.lt - g.lp) + g.pe * (t - p);",
           "cpu", HDR, "dsigma element uses p/(p+eps) instead of t/(t+eps)"),
    # ------------------------------------------------------------------ csrc/cpu
    Mutant("cpu-skip-batch", CPU, "b1 = br.Bk == 1 ? br.B : kb + 1;", "b1 = br.Bk == 1 ? br.B - 1 : kb + 1;", "cpu",
           CPUG, "shared memory's dk/dv skip the last batch element (the issue's example)"),
    Mutant("cpu-partial-block", CPU, "const int64_t nb = std::min(BM, L - i0);\n  const int64_t kb",
           "const int64_t nb = std::min(BM, L - i0 - (L % BM != 0));\n  const int64_t kb", "cpu", CPUG,
           "forward: off-by-one in the partial query block (its last row is never computed)"),
    Mutant("cpu-shared-k", CPU, "const int64_t kb = br.Bk == 1 ? 0 : b;", "const int64_t kb = 0;", "cpu",
           CPUG, "forward: every batch element attends to batch 0's keys"),
    Mutant("cpu-grid-axes", CPU, "int64_t n_img) {\n    ry = T(i / cols);\n    cx = T(i % cols);",
           "int64_t n_img) {\n    ry = T(i % cols);\n    cx = T(i / cols);", "cpu", CPUG,
           "prior (unmasked rows): swapped grid axes (row/column of the query)"),
    Mutant("cpu-dsigma-axes", CPU, "i2c::dsigma_axis<T>(g_kl_prior[x], Sx, W, Stx, sx));",
           "i2c::dsigma_axis<T>(g_kl_prior[x], Sx, W, Stx, sy));", "cpu", CPUG,
           "dsigma_x divided by sigma_y^3"),
    Mutant("cpu-ds-scale", CPU, "dsrow[j] = scale * i2c::ds_elem<T>", "dsrow[j] = i2c::ds_elem<T>", "cpu",
           CPUG, "backward: score scale dropped from ds (dq, dk off by 1/sqrt(D))"),
    Mutant("cpu-rowmax", CPU, "for (int64_t j = 0; j < S; ++j) m = std::max(m, srow[j]);",
           "for (int64_t j = 0; j < S - 1; ++j) m = std::max(m, srow[j]);", "cpu", CPUG,
           "forward: the softmax shift ignores the last key"),
    Mutant("cpu-eps-branch", CPU, "        if (eps > T(0))\n          row_stats<T, true>",
           "        if (eps >= T(0))\n          row_stats<T, true>", "cpu", CPUG,
           "forward: eps = 0 takes the eps path (log(p + 0) instead of the exact log-softmax)"),
    Mutant("gemm-no-acc", GEMM, "for (int dd = 0; dd < NJ; ++dd) acc[r][dd] = C[(j + r) * Dp + d0 + dd];",
           "for (int dd = 0; dd < NJ; ++dd) acc[r][dd] = 0;", "cpu", CPUG,
           "dk/dv GEMM overwrites instead of accumulating over query blocks"),
    # ------------------------------------------------------------------ csrc/cuda (run in the CPU simulation)
    Mutant("cuda-grid-axes", CUDA_COMMON, "  r.qr = float(i / cols);\n  r.qc = float(i % cols);",
           "  r.qr = float(i % cols);\n  r.qc = float(i / cols);", "none", ("sim",),
           "prior: swapped grid axes of the query row (the issue's example)"),
    Mutant("cuda-skip-batch", CUDA_BWD, "b_hi = Bp.Bk == 1 ? B : task.b + 1;",
           "b_hi = Bp.Bk == 1 ? B - 1 : task.b + 1;",
           "none", ("sim",), "dkdv: the shared memory's batch loop skips the last element (the issue's example)"),
    Mutant("cuda-partial-block", CUDA_FWD, "s[a][b] = (j0 + tx + 16 * b < L) ? scale * s[a][b] : -INFINITY;",
           "s[a][b] = (j0 + tx + 16 * b <= L) ? scale * s[a][b] : -INFINITY;", "none", ("sim",),
           "forward pass 1: off-by-one mask in the partial key block (a zero-padded key joins the softmax)"),
    Mutant("cuda-logz-axes", CUDA_LOGZ, "i2c::axis_log_norm<float>(float(i / P.cols), cy, P.rows)",
           "i2c::axis_log_norm<float>(float(i % P.cols), cy, P.rows)", "none", ("sim",),
           "logZ: the row normaliser evaluated at the column"),
    Mutant("cuda-alpha", CUDA_FWD, "const float alpha = expf(m[a] - mnew);", "const float alpha = expf(mnew - m[a]);",
           "none", ("sim",), "online softmax rescaling factor inverted"),
    Mutant("cuda-hsum8", CUDA_COMMON, "  for (int o = 8; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);",
           "  for (int o = 4; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);", "none", ("sim",),
           "half-warp sum reduces over 8 lanes only"),
    Mutant("cuda-dk-scale", CUDA_BWD, "dkrow[tx + 16 * c] = T(scale * dk[a][c]);", "dkrow[tx + 16 * c] = T(dk[a][c]);",
           "none", ("sim",), "dkdv: scale dropped from dk"),
    Mutant("cuda-sty-axis", CUDA_BWD, "sty[a] += e.t * dy2;", "sty[a] += e.t * dx2;", "none", ("sim",),
           "dq kernel: sum t dy^2 accumulates dx^2"),
    Mutant("cuda-v-tile", CUDA_FWD,
           "    load_tile<T, DMAX, BN>(KVs, v, Bp.sv.l, j0, L, D);\n    __syncthreads();\n#pragma unroll 4",
           "    load_tile<T, DMAX, BN>(KVs, k, Bp.sk.l, j0, L, D);\n    __syncthreads();\n#pragma unroll 4", "none",
           ("sim",),
           "forward: out = P K instead of P V"),
]
