"""Which backends exist, which can run here, and why not."""
from __future__ import annotations

import importlib
import os
import warnings
from typing import NamedTuple

import torch


class Backend(NamedTuple):
    """One row of the backend table."""
    name: str
    module: str            # the module with status(), supports_device() and run (kernel backends)
    devices: tuple         # device types it runs on ("any": every device torch has)
    dtypes: str            # input dtypes, as the README states them
    auto: int | None       # preference of backend="auto" on its devices, 1 = first; None = never chosen
    extended: bool         # takes a key_padding_mask and a memory of several images (S = m * L)
    summary: str


# THE table of backends: BACKENDS, dispatch (get_runner), backend="auto", the backends that take masks and
# a memory of several images (functional.EXTENDED_BACKENDS) and the backend table of the docs
# (backend_table_markdown) all derive from it. "auto" tries the kernel backends of a device in the
# order of their `auto` rank and falls back to "reference" (with a warning). The CUDA order (cuda
# before triton) is a placeholder until GPU timings exist: a measured result changes it here, and
# nowhere else.
BACKEND_TABLE: tuple[Backend, ...] = (
    Backend("reference", "fod_kernels.reference", ("any",), "any float dtype", None, True,
            "pure PyTorch, materialises the L x L matrices; the float64 oracle of the tests"),
    Backend("cpu", "fod_kernels.backend_cpu", ("cpu",), "float32, float64 (bfloat16/float16 computed in float32)",
            1, True,
            "fused C++ kernels (csrc/cpu), OpenMP over (branch, batch, head, row block)"),
    Backend("triton", "fod_kernels.backend_triton", ("cuda",), "float32, bfloat16, float16 (fp32 accumulation)",
            2, True,
            "fused Triton kernels, FlashAttention-2 style (tensor cores for bf16/fp16/tf32); CPU tensors "
            "only under the Triton interpreter (tests)"),
    Backend("cuda", "fod_kernels.backend_cuda", ("cuda",), "float32, bfloat16, float16 (fp32 accumulation)", 1, True,
            "fused CUDA C++ kernels (csrc/cuda), SIMT fp32"),
)
_TABLE = {b.name: b for b in BACKEND_TABLE}
BACKENDS = tuple(b.name for b in BACKEND_TABLE)
KERNEL_BACKENDS = tuple(b.name for b in BACKEND_TABLE if b.name != "reference")


def auto_order(device_type: str) -> tuple[str, ...]:
    """The kernel backends backend="auto" tries on a device type, first choice first."""
    rows = [b for b in BACKEND_TABLE if b.auto is not None and device_type in b.devices]
    return tuple(b.name for b in sorted(rows, key=lambda b: b.auto))


def backend_table_markdown() -> str:
    """The backend table as Markdown (for the README; `python -c "import fod_kernels._backends as b;
    print(b.backend_table_markdown())"`)."""
    lines = ["| backend | devices | dtypes | `auto` preference | masks, S != L | what it is |",
             "|---|---|---|---|---|---|"]
    for b in BACKEND_TABLE:
        if b.auto is None:
            pref = "fallback" if b.name == "reference" else "never"
        else:
            pref = ", ".join(f"{dev}: {auto_order(dev).index(b.name) + 1}" for dev in b.devices)
        lines.append(f"| `{b.name}` | {', '.join(b.devices)} | {b.dtypes} | {pref} | {'yes' if b.extended else 'no'} "
                     f"| {b.summary} |")
    return "\n".join(lines)


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _module(name):
    return importlib.import_module(_TABLE[name].module)


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
    if backend == "auto" and device.type == "meta":  # shapes only: the reference's are every backend's
        return "reference"
    if backend == "auto":
        order = auto_order(device.type)
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
        name = resolve_backend(backend, torch.device(device_type))
        if name != "reference":
            _load_runner(name)  # imported here, eagerly: get_runner is then a dict lookup, traceable
        _resolved[key] = name
    return _resolved[key]


_resolved: dict = {}


_runners: dict = {}  # name -> run, filled outside any torch.compile trace (dynamo does not trace imports)


def _load_runner(name: str):
    if name not in _runners:
        if name not in KERNEL_BACKENDS:
            raise ValueError(f"unknown kernel backend {name!r}; kernel backends: {KERNEL_BACKENDS}")
        _runners[name] = importlib.import_module(_TABLE[name].module).run
    return _runners[name]


def get_runner(name: str):
    """The KernelRunner of a kernel backend: run(branches, rows, cols, scale, eps, need_stats, masks=None)
    (fod_kernels/_custom_op.py)."""
    return _runners[name] if name in _runners else _load_runner(name)
