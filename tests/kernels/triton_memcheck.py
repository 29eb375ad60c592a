"""Memory checking for Triton kernels under the interpreter (TRITON_INTERPRET=1).

``checked_launches()`` wraps the interpreter's builder so that every pointer remembers the tensor
argument it was derived from (its *region*: the bytes the tensor view can reach), and every
masked-in address of every load and store must lie inside that region. An address outside it
raises ``OutOfBounds`` naming the kernel, the program id, the region and the first bad address:
on a GPU such an access reads garbage or faults and poisons the CUDA context.

The check is by provenance, not by "some allocation": a load of K that runs past K into a
neighbouring tensor is caught too. It sees every launch made through ``triton.jit`` kernels while
the context is active (the interpreter runs launches on the host, one program at a time).
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as _interp

_KEY = "fod_region"  # TensorHandle.attr key: (lo, hi, description)
_state = threading.local()


class OutOfBounds(AssertionError):
    pass


def region(t) -> tuple[int, int, str]:
    """[lo, hi) bytes a tensor view can address (its strides may skip bytes inside, never beyond)."""
    lo = t.data_ptr()
    if t.numel() == 0:
        span = 0
    else:
        if any(s < 0 for s in t.stride()):
            raise ValueError("negative strides are not supported by the memory check")
        span = (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()
    return lo, lo + span, f"{tuple(t.shape)} stride {tuple(t.stride())} {t.dtype}"


def _tag(handle, reg):
    handle.attr[_KEY] = reg
    return handle


def _is_ptr(h):
    return isinstance(h, _interp.TensorHandle) and isinstance(h.dtype, tl.pointer_type)


def _check(kind, ptrs, mask):
    reg = ptrs.attr.get(_KEY)
    where = f"{_state.kernel} program {tuple(_interp.interpreter_builder.grid_idx)}"
    if reg is None:
        raise OutOfBounds(f"{kind} in {where} through a pointer that derives from no tensor argument")
    lo, hi, what = reg
    addr = np.broadcast_to(ptrs.data, np.shape(mask.data))[np.asarray(mask.data, dtype=bool)]
    width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    bad = (addr < lo) | (addr + np.uint64(width) > hi)
    if bad.any():
        first = int(addr[bad][0])
        raise OutOfBounds(f"{kind} in {where}: {int(bad.sum())} of {addr.size} masked-in addresses outside the "
                          f"argument {what} (bytes [{lo:#x}, {hi:#x})); first at {first:#x} "
                          f"(offset {first - lo:+d} bytes)")
    _state.counts[(_state.kernel, kind)] += int(addr.size)


def _propagate(fn):
    """A builder method whose pointer result inherits the region of its first pointer operand."""
    def wrapped(*args, **kwargs):
        res = fn(*args, **kwargs)
        if _is_ptr(res) and _KEY not in res.attr:
            for a in list(args) + list(kwargs.values()):
                if _is_ptr(a) and _KEY in a.attr:
                    return _tag(res, a.attr[_KEY])
        return res
    return wrapped


def _unsupported(name):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"the memory check does not cover {name}; extend tests/kernels/triton_memcheck.py")
    return fail


@contextlib.contextmanager
def checked_launches():
    """Yields a Counter {(kernel name, "load"|"store"): masked-in accesses checked}."""
    builder = _interp.interpreter_builder
    counts: Counter = Counter()
    patched = {}

    def patch(name, new):
        patched[name] = builder.__dict__.get(name)
        setattr(builder, name, new)

    orig_load, orig_store = builder.create_masked_load, builder.create_masked_store

    def masked_load(ptrs, mask, *rest):
        _check("load", ptrs, mask)
        return orig_load(ptrs, mask, *rest)

    def masked_store(ptrs, value, mask, *rest):
        _check("store", ptrs, mask)
        return orig_store(ptrs, value, mask, *rest)

    for name in dir(builder):
        if name.startswith("create_") and name not in ("create_masked_load", "create_masked_store"):
            attr = getattr(builder, name)
            if callable(attr):
                patch(name, _propagate(attr))
    patch("create_masked_load", masked_load)
    patch("create_masked_store", masked_store)
    for name in ("create_atomic_cas", "create_atomic_rmw", "create_descriptor_load", "create_descriptor_store",
                 "create_descriptor_gather", "create_descriptor_scatter", "create_tensor_pointer_load",
                 "create_tensor_pointer_store"):
        if hasattr(builder, name):
            patch(name, _unsupported(name))

    orig_cvt = _interp._implicit_cvt

    def implicit_cvt(arg):
        res = orig_cvt(arg)
        if hasattr(arg, "data_ptr") and isinstance(res, tl.tensor):
            _tag(res.handle, region(arg))
        return res

    orig_call = _interp.GridExecutor.__call__

    def call(self, *args, **kwargs):
        outer = getattr(_state, "kernel", None)
        _state.kernel = self.fn.__name__
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            _state.kernel = outer

    _state.counts = counts
    _interp._implicit_cvt = implicit_cvt
    _interp.GridExecutor.__call__ = call
    try:
        yield counts
    finally:
        _interp._implicit_cvt = orig_cvt
        _interp.GridExecutor.__call__ = orig_call
        for name, old in patched.items():
            if old is None:
                delattr(builder, name)
            else:
                setattr(builder, name, old)
