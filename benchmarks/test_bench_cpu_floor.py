"""One I2Correlation branch forward+backward on the CPU: the `cpu` kernels under every instruction-set variant
this CPU runs, torch's SDPA forward+backward (no statistics: the lower bound) and the reference, in one run;
and the rates the floor is computed from (benchmarks/cpu_floor.py, docs/CPU_FLOOR.md). Opt-in:

    pytest benchmarks/test_bench_cpu_floor.py --benchmark-only --fod-cpu-floor --benchmark-json=floor.json
    python benchmarks/cpu_floor.py floor.json

Shape B=2, H=8, L=1024 (32 x 32 grid), D=32, float32, eps=1e-4; threads: --fod-threads (default: torch's).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fod_kernels as fk
from fod_kernels import backend_cpu
from machine import cpu_model

B, H, GRID, D, EPS = 2, 8, (32, 32), 32, 1e-4
L = GRID[0] * GRID[1]


def _variants():
    try:
        return backend_cpu.runnable_variants()
    except RuntimeError:
        return []


PROVIDERS = [f"cpu-{v}" for v in _variants()] + ["sdpa", "reference"]


@pytest.fixture(autouse=True)
def _opt_in(request):
    if not request.config.getoption("--fod-cpu-floor"):
        pytest.skip("the CPU floor benchmark runs with --fod-cpu-floor")


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).requires_grad_() for _ in range(3))
    s = (0.3 + 1.7 * torch.rand(B, H, L, 2, generator=g)).requires_grad_()
    w = torch.randn(B, H, L, D, generator=g)
    return q, k, v, s, w


def _rounds(fn, budget=4.0, lo=3, hi=15):
    import time
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    return max(lo, min(hi, int(budget / max(time.perf_counter() - t0, 1e-6))))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_branch_fwd_bwd(benchmark, provider, monkeypatch):
    q, k, v, s, w = _inputs()
    variant = None
    if provider.startswith("cpu-"):
        variant = provider[4:]
        monkeypatch.setenv(backend_cpu.ENV, variant)
    backend = "cpu" if variant else provider

    def step():
        for t in (q, k, v, s):
            t.grad = None
        if provider == "sdpa":
            (F.scaled_dot_product_attention(q, k, v) * w).sum().backward()
            return
        out, st = fk.correlation_attention(q, k, v, s, GRID, eps=EPS, backend=backend)
        ((out * w).sum() + st.kl_attn.sum() * 0.5 + st.kl_prior.sum() * 0.5 + st.entropy.sum() * 0.1).backward()

    if variant:
        assert backend_cpu.variant() == variant
    benchmark.group = f"cpu floor: one branch fwd+bwd B{B} H{H} L{L} D{D} float32"
    benchmark.pedantic(step, rounds=_rounds(step, hi=5 if provider == "reference" else 15), iterations=1)
    benchmark.extra_info.update(floor_kind="branch", provider=provider.split("-")[0], variant=variant,
                                cpu_model=cpu_model(), torch_capability=torch.backends.cpu.get_cpu_capability(),
                                threads=torch.get_num_threads(), B=B, H=H, L=L, D=D, eps=EPS,
                                fod_cpu_capability=os.environ.get(backend_cpu.ENV))


N_ELEM, REPEAT = 1 << 16, 64  # 256 KiB in and out: cache-resident, so the rate is the vector units', not memory's
M_GEMM = 2048


@pytest.mark.parametrize("rate_of", ["sgemm", "exp", "log", "div"])
def test_rate(benchmark, rate_of):
    """The CPU's measured vector rates: sgemm flop/s (torch.mm), and exp, log, division per second (ATen's
    vectorised float32 kernels, out= into a preallocated cache-resident tensor, REPEAT calls a round)."""
    g = torch.Generator().manual_seed(0)
    if rate_of == "sgemm":
        a, b, c = (torch.randn(M_GEMM, M_GEMM, generator=g) for _ in range(3))
        fn, work = (lambda: torch.mm(a, b, out=c)), 2.0 * M_GEMM ** 3
    else:
        x, y, out = torch.rand(N_ELEM, generator=g) + 0.5, torch.rand(N_ELEM, generator=g) + 0.5, torch.empty(N_ELEM)
        one = {"exp": lambda: torch.exp(x, out=out), "log": lambda: torch.log(x, out=out),
               "div": lambda: torch.div(x, y, out=out)}[rate_of]

        def fn():
            for _ in range(REPEAT):
                one()
        work = float(N_ELEM * REPEAT)
    benchmark.group = "cpu floor: rates"
    benchmark.pedantic(fn, rounds=_rounds(fn, budget=2.0, lo=5, hi=30), iterations=1)
    benchmark.extra_info.update(floor_kind="rate", rate_of=rate_of, rate_per_s=work / benchmark.stats.stats.median,
                                cpu_model=cpu_model(), threads=torch.get_num_threads())
