"""Options, case lists and shared caches of the benchmark suite.

    pytest benchmarks/ --benchmark-only                        # default: FOD's two levels
    pytest benchmarks/ --benchmark-only --fod-sweep            # + scale sweep L = 256 .. 16384
    pytest benchmarks/ --benchmark-only --fod-oom              # + out-of-memory boundary at batch 8
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json && python benchmarks/report.py out.json

Unavailable providers are skipped with the reason ``fod_kernels.available_backends()`` gives.
Triton is never run under its CPU interpreter here (unlike tests/conftest.py).
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("FOD_KERNELS_QUIET", "1")

import providers as P  # noqa: E402
from machine import cpu_model  # noqa: E402

CPU_BATCHES = {"l2": (1, 2), "l3": (1, 2, 8)}
GPU_BATCHES = {"l2": (1, 8, 32), "l3": (1, 8, 32)}
SWEEP_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def pytest_addoption(parser):
    g = parser.getgroup("fod", "FOD I2Correlation benchmarks")
    g.addoption("--fod-device", default="auto", help="cpu, cuda, or auto (cuda if present, else cpu)")
    g.addoption("--fod-providers", default=",".join(P.PROVIDERS), help="comma list of providers")
    g.addoption("--fod-modes", default=",".join(P.MODES), help="comma list of modes")
    g.addoption("--fod-levels", default="l2,l3", help="l2 (L=1024, D=32) and/or l3 (L=256, D=64)")
    g.addoption("--fod-batches", default="", help="batch sizes for every level (default per device)")
    g.addoption("--fod-dtypes", default="", help="default float32 on CPU, float32,bfloat16 on CUDA")
    g.addoption("--fod-case-seconds", type=float, default=None,
                help="timing budget per case, rounds = budget / one call (default 1 s CPU, 0.5 s CUDA)")
    g.addoption("--fod-min-rounds", type=int, default=3)
    g.addoption("--fod-max-rounds", type=int, default=None, help="default 15 CPU, 100 CUDA")
    g.addoption("--fod-no-mem", action="store_true", help="skip the peak-memory measurements")
    g.addoption("--fod-threads", type=int, default=0, help="torch.set_num_threads for the run (0: torch's default)")
    g.addoption("--fod-sweep", action="store_true", help="also run the scale sweep L = 256 .. 16384 (B=1, D=32)")
    g.addoption("--fod-sweep-lengths", default=",".join(map(str, SWEEP_LENGTHS)))
    g.addoption("--fod-sweep-modes", default="fwd+bwd,infer")
    g.addoption("--fod-oom", action="store_true", help="also search the out-of-memory boundary at batch 8")
    g.addoption("--fod-oom-cap-gb", type=float, default=16.0, help="CPU memory cap of the OOM search (GiB)")
    g.addoption("--fod-oom-trial-seconds", type=int, default=240, help="time limit of one OOM trial")
    g.addoption("--fod-model", action="store_true", default=None,
                help="full-model benchmark (default: on with CUDA, off on CPU where it takes ~6 min)")
    g.addoption("--fod-no-model", action="store_false", dest="fod_model")
    g.addoption("--at-windows", default="100,512",
                help="Anomaly Transformer train-step windows (issue 22: 100,512,2048,8192; default 100,512)")
    g.addoption("--at-mem-cap-gb", type=float, default=8.0,
                help="memory cap of one Anomaly Transformer step's peak-memory probe (GiB)")
    g.addoption("--fod-model-batch", type=int, default=0, help="batch of the full-model benchmark (1 CPU, 8 CUDA)")


def pytest_configure(config):
    n = config.getoption("--fod-threads", default=0)
    if n:
        torch.set_num_threads(n)


def _csv(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def _devices(config):
    d = config.getoption("--fod-device")
    if d == "auto":
        return ["cuda" if torch.cuda.is_available() else "cpu"]
    return _csv(d)


def _dtypes(config, device):
    names = _csv(config.getoption("--fod-dtypes")) or (["float32", "bfloat16"] if device == "cuda" else ["float32"])
    return names


def operator_cases(config):
    cases = []
    provs = _csv(config.getoption("--fod-providers"))
    modes = _csv(config.getoption("--fod-modes"))
    for device in _devices(config):
        for dtype in _dtypes(config, device):
            for level in _csv(config.getoption("--fod-levels")):
                L, D = P.LEVELS[level]
                batches = [int(b) for b in _csv(config.getoption("--fod-batches"))] or \
                    (GPU_BATCHES if device == "cuda" else CPU_BATCHES)[level]
                for B in batches:
                    for mode in modes:
                        for prov in provs:
                            cases.append(dict(provider=prov, mode=mode, B=B, L=L, D=D, dtype=dtype,
                                              device=device, level=level, kind="operator"))
    return cases


def sweep_cases(config):
    if not config.getoption("--fod-sweep"):
        return []
    cases = []
    for device in _devices(config):
        for dtype in _dtypes(config, device):
            for L in (int(x) for x in _csv(config.getoption("--fod-sweep-lengths"))):
                for mode in _csv(config.getoption("--fod-sweep-modes")):
                    for prov in _csv(config.getoption("--fod-providers")):
                        cases.append(dict(provider=prov, mode=mode, B=1, L=L, D=32, dtype=dtype, device=device,
                                          level="sweep", kind="sweep"))
    return cases


def case_id(c):
    return f"{c['provider']}-{c['mode']}-B{c['B']}-L{c['L']}-D{c['D']}-{c['dtype']}-{c['device']}"


def pytest_generate_tests(metafunc):
    if "op_case" in metafunc.fixturenames:
        cases = operator_cases(metafunc.config)
        metafunc.parametrize("op_case", cases, ids=[case_id(c) for c in cases])
    if "sweep_case" in metafunc.fixturenames:
        cases = sweep_cases(metafunc.config)
        metafunc.parametrize("sweep_case", cases, ids=[case_id(c) for c in cases])
    if "oom_case" in metafunc.fixturenames:
        cases = []
        if metafunc.config.getoption("--fod-oom"):
            for device in _devices(metafunc.config):
                for prov in _csv(metafunc.config.getoption("--fod-providers")):
                    cases.append(dict(provider=prov, device=device))
        metafunc.parametrize("oom_case", cases, ids=[f"{c['provider']}-{c['device']}" for c in cases])


class Session:
    """Caches shared by all cases of one run: providers, inputs, CPU memory probes."""

    def __init__(self, config):
        self.config = config
        self.providers = {}
        self.inputs = {}
        self.memprobes = {}

    def provider(self, name):
        if name not in self.providers:
            self.providers[name] = P.make_provider(name)
        return self.providers[name]

    def inputs_for(self, B, L, D, dtype, device):
        key = (B, L, D, dtype, device)
        if key not in self.inputs:
            self.inputs.clear()  # one shape alive at a time keeps memory measurements and RSS honest
            self.inputs[key] = P.make_inputs(B, L, D, P.DTYPES[dtype], device)
        return self.inputs[key]

    def cpu_memory(self, provider, B, L, D, dtype, mode, modes):
        """Peak memory of one mode, measured for all modes of (provider, shape) in one subprocess."""
        key = (provider, B, L, D, dtype)
        if key not in self.memprobes:
            self.memprobes[key] = P.memprobe_subprocess(provider, B, L, D, P.DTYPES[dtype], modes)
        res = self.memprobes[key]
        if "error" in res:
            return {"mem_error": res["error"]}
        return res["modes"].get(mode, {"mem_error": f"mode {mode} not measured"})

    def timing(self, device):
        cuda = device == "cuda"
        budget = self.config.getoption("--fod-case-seconds") or (0.5 if cuda else 1.0)
        max_rounds = self.config.getoption("--fod-max-rounds") or (100 if cuda else 15)
        return budget, self.config.getoption("--fod-min-rounds"), max_rounds


@pytest.fixture(scope="session")
def fod_session(request):
    return Session(request.config)


def pytest_benchmark_update_machine_info(config, machine_info):
    import fod_kernels
    info = {"load_average_at_end": list(os.getloadavg()), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(), "cpu_model": cpu_model(),
            "backends": {k: [bool(v.available), v.reason] for k, v in fod_kernels.available_backends().items()}}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable: {exc}"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    machine_info["fod"] = info
