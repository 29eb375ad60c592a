"""One FOD I2Correlation layer (both branches + the FOD losses), every provider side by side.

Default cases: FOD's two levels (L=1024, D=32 and L=256, D=64; H=8), batch 1 and 2
(and 8 at L=256) on CPU, 1, 8 and 32 on CUDA; float32 (and bfloat16 on CUDA);
modes forward, backward, forward+backward and inference-only scoring.
``--fod-sweep`` adds L = 256 .. 16384 at B=1, D=32.
Per case, ``benchmark.extra_info`` holds the median and spread, TFLOP/s, and peak memory.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import providers as P


def _mem_available_bytes(device):
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.9)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024 * 8 // 10
    return 0


# Bytes per (L, S) element per batch and head that the materialising providers need in their
# worst mode, measured on this suite's CPU runs (peak / (B*H*L*L*itemsize), rounded up):
# used only to skip sweep points that cannot fit, never as a result.
MATERIALISED_MATRICES = {"reference": 24, "compile": 16, "official": 40}


def run_case(benchmark, sess, c):
    prov = sess.provider(c["provider"])
    dtype = P.DTYPES[c["dtype"]]
    device = c["device"]
    B, L, D, mode = c["B"], c["L"], c["D"], c["mode"]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, why = prov.availability(device, dtype)
    if not ok:
        pytest.skip(f"{c['provider']}: {why}")
    if c["provider"] in MATERIALISED_MATRICES:
        need = MATERIALISED_MATRICES[c["provider"]] * B * P.H * L * L * torch.finfo(dtype).bits // 8
        have = _mem_available_bytes(device)
        if need > have:
            pytest.skip(f"{c['provider']} materialises (L, L): needs about {need / 2**30:.1f} GiB, "
                        f"{have / 2**30:.1f} GiB usable here")

    inp = sess.inputs_for(B, L, D, c["dtype"], device)
    mem = {}
    if not sess.config.getoption("--fod-no-mem"):
        if device == "cuda":
            mem = P.measure_modes(prov, [mode], inp, P.CudaMeter(torch.device(device)))[mode]
            mem["mem_method"] = "torch.cuda.max_memory_allocated minus allocated before the call"
        else:
            opt = "--fod-modes" if c["kind"] == "operator" else "--fod-sweep-modes"
            modes = tuple(m.strip() for m in sess.config.getoption(opt).split(",") if m.strip())
            mem = sess.cpu_memory(c["provider"], B, L, D, c["dtype"], mode, modes)
            mem["mem_method"] = "RSS high-water growth in a fresh subprocess (VmHWM reset via clear_refs)"
    target, setup = P.mode_callables(prov, mode, inp)
    # Warm-up, then the cost of one call decides the rounds: the memory probe's call when there was one
    # (it ran warm, at this shape), else a warm call here.
    t0 = time.perf_counter()
    P.warm_up(prov, mode, inp)
    first = time.perf_counter() - t0
    one = mem.get("probe_call_s")
    if one is None:
        t0 = time.perf_counter()
        P.run_once(prov, mode, inp)
        one = time.perf_counter() - t0
    inp.zero_grads()
    budget, rmin, rmax = sess.timing(device)
    rounds = max(rmin, min(rmax, int(budget / max(one, 1e-6))))

    benchmark.group = f"{c['kind']} {mode} B{B} L{L} D{D} {c['dtype']} {device}"
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1)
    inp.zero_grads()

    st = benchmark.stats.stats
    fl = P.flops(mode, B, P.H, L, D)
    extra = dict(c, H=P.H, S=L, grid=list(inp.grid), rounds=rounds, warm_up_s=first, flops=fl,
                 median_s=st.median, iqr_s=st.iqr, min_s=st.min, max_s=st.max, stddev_s=st.stddev,
                 tflops=fl / st.median / 1e12)
    extra.update(mem)
    benchmark.extra_info.update(extra)


def test_operator(benchmark, fod_session, op_case):
    run_case(benchmark, fod_session, op_case)


def test_sweep(benchmark, fod_session, sweep_case):
    run_case(benchmark, fod_session, sweep_case)
