"""The runtime instruction-set dispatch of the CPU kernels (fod_kernels.backend_cpu, _build_flags.CPU_VARIANTS).

The kernels are built once per variant (default, avx2, avx512) and one is chosen at load: the widest the CPU
runs, or FOD_CPU_CAPABILITY. Here: the choice, the override and its refusals, the CPU detection against
/proc/cpuinfo, and every variant this CPU runs against the float64 reference (values and all gradients,
masked and multi-image keys included). CI also re-runs the CPU kernel test modules under each narrower
variant (.ci/run); this module is the quick per-variant check that runs everywhere.
"""
from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

import fod_kernels as fk
from fod_kernels import _build_flags, backend_cpu
from test_mask_memory_kernels import check_masked, masked_case  # noqa: E402  (tests/kernels is on the path)

pytestmark = pytest.mark.skipif(not fk.available_backends()["cpu"].available,
                                reason=f"cpu backend: {fk.available_backends()['cpu'].reason}")

RUNS = backend_cpu.runnable_variants() if fk.available_backends()["cpu"].available else []


@pytest.fixture
def fresh(monkeypatch):
    """A clean selection cache and no FOD_CPU_CAPABILITY; monkeypatch restores both."""
    monkeypatch.setattr(backend_cpu, "_selected", {})
    monkeypatch.delenv(backend_cpu.ENV, raising=False)
    return monkeypatch


def _cpuinfo_capability():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx2", "fma"} <= flags:
        return "avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else "avx2"
    return "default"


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="x86-64 Linux cpuinfo")
def test_cpu_detection_agrees_with_cpuinfo():
    assert RUNS[-1] == _cpuinfo_capability()
    assert RUNS == list(_build_flags.CPU_VARIANTS)[:len(RUNS)]


def test_the_widest_variant_runs_by_default(fresh):
    assert backend_cpu.variant() == RUNS[-1]
    st = fk.available_backends()["cpu"]
    assert st.available and f"variant {RUNS[-1]} " in st.reason


def test_variant_flags():
    """The portable variant names no instruction set; each other names its own (so a module compiled for one
    CPU never lands in another variant's slot)."""
    assert not [f for f in _build_flags.cpu_flags("default") if f.startswith("-m")]
    if "avx2" in _build_flags.CPU_VARIANTS:
        assert {"-mavx2", "-mfma"} <= set(_build_flags.cpu_flags("avx2"))
        assert not [f for f in _build_flags.cpu_flags("avx2") if f.startswith("-mavx512")]
        assert {"-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"} <= set(_build_flags.cpu_flags("avx512"))
    for v, (ext, _) in _build_flags.CPU_VARIANTS.items():
        assert _build_flags.cpu_variant_of(ext) == v and f"-DFOD_CPU_VARIANT={v}" in _build_flags.cpu_flags(v)


@pytest.mark.parametrize("variant", RUNS)
def test_override_selects_the_variant(fresh, variant):
    fresh.setenv(backend_cpu.ENV, variant.upper())  # ATen's spelling (AVX512) works too
    assert backend_cpu.variant() == variant
    assert backend_cpu.selected()[1].VARIANT == variant
    assert f"variant {variant} " in fk.available_backends()["cpu"].reason


def test_override_refuses_unknown_and_unrunnable(fresh):
    fresh.setenv(backend_cpu.ENV, "sse9")
    st = fk.available_backends()["cpu"]
    assert not st.available and "choose one of default" in st.reason
    # a CPU that runs only the portable variant: every wider one is refused, with the reason, not replaced
    fresh.setattr(backend_cpu, "runnable_variants", lambda: ["default"])
    for v in list(_build_flags.CPU_VARIANTS)[1:]:
        fresh.setattr(backend_cpu, "_selected", {})
        fresh.setenv(backend_cpu.ENV, v)
        st = fk.available_backends()["cpu"]
        assert not st.available and "cannot run" in st.reason, st
        q = torch.randn(1, 1, 4, 8)
        with pytest.raises(RuntimeError, match="cannot run"):
            fk.correlation_attention(q, q, q, torch.ones(1, 1, 4, 2), (2, 2), backend="cpu")
    fresh.delenv(backend_cpu.ENV)
    fresh.setattr(backend_cpu, "_selected", {})
    assert backend_cpu.variant() == "default"


def test_a_missing_variant_is_said(fresh):
    """The widest variant not built: the next one runs and the status says which is missing."""
    if len(RUNS) < 2:
        pytest.skip("this CPU runs one variant")
    real = backend_cpu._ext.load
    widest = _build_flags.CPU_VARIANTS[RUNS[-1]][0]
    fresh.setattr(backend_cpu._ext, "load", lambda name: (None, "not built here") if name == widest else real(name))
    assert backend_cpu.variant() == RUNS[-2]
    assert f"widest this CPU runs is {RUNS[-1]}; not built: {RUNS[-1]} (not built here)" in backend_cpu.status()[1]
    fresh.setattr(backend_cpu, "_selected", {})
    fresh.setenv(backend_cpu.ENV, RUNS[-1])
    assert not backend_cpu.status()[0]


CASES = [  # (grid, B, H, D, key images m, batch-shared keys, mask kind, eps, dtype, sigma range)
    ((5, 7), 2, 2, 16, 1, False, "none", 1e-4, torch.float32, (1e-5, 2.0)),
    ((4, 10), 2, 1, 33, 2, True, "per_batch", 0.0, torch.float32, (1e-5, 2.0)),
    ((6, 6), 1, 2, 32, 1, False, "none", 1e-2, torch.float64, (1e-5, 2.0)),
    ((37, 3), 2, 1, 8, 1, True, "none", 1e-4, torch.float32, (0.1, 2.0)),  # L = 111: not a multiple of 32 rows
]


@pytest.mark.parametrize("variant", RUNS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_each_variant_matches_float64_reference(fresh, variant, case):
    grid, B, H, D, m, shared, mask_kind, eps, dtype, sigma = CASES[case]
    fresh.setenv(backend_cpu.ENV, variant)
    branch, mask = masked_case(grid, B, H, D, m, shared, mask_kind, seed=case, sigma=sigma)
    check_masked("cpu", branch, grid, eps, mask, dtype, label=f"{variant} case {case}")
    assert backend_cpu.variant() == variant
