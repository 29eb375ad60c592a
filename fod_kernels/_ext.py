"""Loading the compiled C++/CUDA extensions, with a clear word when one is missing."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from ._build_flags import EXTENSIONS

_ROOT = Path(__file__).resolve().parent.parent
_CSRC = _ROOT / "csrc"
_cache: dict[str, tuple] = {}


def _build_hint(name: str) -> str:
    return (f"build it with `pip install --no-build-isolation -e .` from the repository root, "
            f"or call fod_kernels._ext.jit_build({name!r}) (set FOD_KERNELS_JIT=1 to do that on import)")


def load(name: str):
    """Return (module, None) or (None, reason)."""
    if name in _cache:
        return _cache[name]
    try:
        mod, why = importlib.import_module(f"fod_kernels.{name}"), None
    except ImportError as exc:
        mod, why = None, f"compiled extension fod_kernels.{name} is not importable ({exc}); {_build_hint(name)}"
        if os.environ.get("FOD_KERNELS_JIT") == "1":
            try:
                mod, why = jit_build(name), None
            except Exception as jexc:  # report the compiler's own words
                why = f"{why}; the JIT build failed too: {jexc}"
    _cache[name] = (mod, why)
    return _cache[name]


def require(name: str):
    """The loaded extension, or a RuntimeError with the reason it is missing."""
    mod, why = load(name)
    if mod is None:
        raise RuntimeError(why)
    return mod


def jit_build(name: str, verbose: bool = False):
    """Compile an extension with torch.utils.cpp_extension.load (cached under TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import load as _load

    from ._build_flags import cpu_flags, cpu_link_flags, cpu_variant_of, cuda_flags

    sources, is_cuda = EXTENSIONS[name]
    cflags = cpu_flags() if is_cuda else cpu_flags(cpu_variant_of(name))  # the CPU variant's own flags
    kw = dict(extra_cflags=cflags, extra_ldflags=cpu_link_flags(), extra_include_paths=[str(_CSRC)])
    if is_cuda:
        kw["extra_cuda_cflags"] = cuda_flags()
    mod = _load(name=f"fod_kernels_{name.strip('_')}", sources=[str(_CSRC / s) for s in sources],
                verbose=verbose, **kw)
    _cache[name] = (mod, None)
    return mod
