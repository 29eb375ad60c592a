"""Which backends exist, which can run here, and why not."""
from __future__ import annotations

import importlib
import os
import warnings
from typing import NamedTuple

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
_MODULES = {"cpu": "fod_kernels.backend_cpu", "triton": "fod_kernels.backend_triton",
            "cuda": "fod_kernels.backend_cuda"}
# Preference of "auto" per device type, fastest first.
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _module(name):
    return importlib.import_module(_MODULES[name])


def backend_status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(True, "pure PyTorch, materialises L x L; any device and float dtype")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")
    try:
        mod = _module(name)
    except Exception as exc:  # an import failure is a reason, reported verbatim
        return BackendStatus(False, f"fod_kernels.backend_{name} failed to import: {exc}")
    return BackendStatus(*mod.status())


def available_backends() -> dict[str, BackendStatus]:
    """For each backend: can it run here, and if not, why."""
    return {name: backend_status(name) for name in BACKENDS}


def _supports_device(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "reference":
        return True, ""
    return _module(name).supports_device(device)


_warned = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn 'auto' into a concrete backend; raise if an explicit one cannot run."""
    if backend == "auto":
        order = _AUTO_ORDER.get(device.type, ())
        reasons = []
        for name in order:
            st = backend_status(name)
            if st.available and _supports_device(name, device)[0]:
                return name
            reasons.append(f"{name}: {st.reason if not st.available else _supports_device(name, device)[1]}")
        if device.type not in _warned and os.environ.get("FOD_KERNELS_QUIET") != "1":
            _warned.add(device.type)
            warnings.warn(f"fod_kernels: no fused kernel backend for {device.type} tensors "
                          f"({'; '.join(reasons) or 'none exists'}); 'auto' uses the materialising "
                          "'reference' backend", RuntimeWarning, stacklevel=3)
        return "reference"
    st = backend_status(backend)
    if not st.available:
        raise RuntimeError(f"backend {backend!r} is not available: {st.reason}")
    ok, why = _supports_device(backend, device)
    if not ok:
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: {why}")
    return backend


@torch.compiler.assume_constant_result
def resolve_backend_name(backend: str, device_type: str) -> str:
    """resolve_backend, memoised per (backend, device type); a constant for torch.compile."""
    key = (backend, device_type)
    if key not in _resolved:
        _resolved[key] = resolve_backend(backend, torch.device(device_type))
    return _resolved[key]


_resolved: dict = {}


def get_runner(name: str):
    """run(branches, rows, cols, scale, eps, need_stats) of a kernel backend (static imports, traceable)."""
    if name == "cpu":
        from . import backend_cpu
        return backend_cpu.run
    if name == "cuda":
        from . import backend_cuda
        return backend_cuda.run
    if name == "triton":
        from . import backend_triton
        return backend_triton.run
    raise ValueError(f"unknown kernel backend {name!r}")
